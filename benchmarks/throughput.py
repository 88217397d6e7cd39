"""Training-step and IWAE-evaluation throughput of jaxvae.

Benchmarks the step ``train.py`` runs (``jaxvae.train_step.make_train_step``: forward + backward
of the configured objective + the optax update, ``jit`` over a batch sharded on a ``data`` mesh,
state donated) on random images of the config's shape, and reports:

- ``images/s``: median over ``--windows`` timed windows of ``--steps`` steps each, after
  warm-up. Steps are dispatched back to back; the host waits only at the end of a window
  (as ``train.py`` does between logging steps), so the figure includes no per-step host sync.
  The batches are placed on the devices beforehand (the input pipeline's cost is not measured).
- ``compile_s``: wall time of ``step.lower(...).compile()``.
- ``peak_rss_mib``: the process's peak resident memory (``resource.getrusage``), and
  ``peak_device_mib`` where the backend reports ``memory_stats()['peak_bytes_in_use']``
  (GPU/TPU; the CPU backend reports nothing), also right after compilation (a process-wide
  peak: it includes what earlier rows of the same run allocated).

With ``--eval``: the evaluation step of ``jaxvae.evaluate`` (ELBO + IWAE with
``--iwae-samples`` K, decoded ``--iwae-chunk`` at a time), reported as posterior samples
decoded per second (``K * batch / time``).

Examples (CPU; ``--num-devices N > 1`` splits the CPU into N XLA host devices)::

    python benchmarks/throughput.py --config seed
    python benchmarks/throughput.py --config mnist --conv-impl xla gemm --json out.json
    python benchmarks/throughput.py --config mnist mnist_nll --eval --eval-batch-size 500
    python benchmarks/throughput.py --config mnist_iwae mnist_iwae_dreg mnist_vamp   # options
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = {
    "seed": "celeba.py",
    "mnist": "mnist.py",
    "mnist_nll": "mnist_nll.py",
    "mnist_iwae": "mnist_iwae.py",
    "mnist_iwae_dreg": "mnist_iwae_dreg.py",
    "mnist_vamp": "mnist_vamp.py",
    "mnist_iwae_vamp_dreg": "mnist_iwae_vamp_dreg.py",
}
ROOT = Path(__file__).resolve().parent.parent


def _set_host_devices(num_devices: int) -> None:
    """Must run before jax initialises its backends."""
    if num_devices > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}"


def set_malloc(choice: str) -> None:
    """``hugepages``: what ``train.py`` does (``jaxvae.host_memory``); ``default``: glibc as is.

    Both re-execute the command line when the process does not match the choice yet, so this
    must run before jax (or torch) is imported.
    """
    from jaxvae import host_memory

    if choice == "hugepages":
        host_memory.reexec_with_hugepages()
    else:
        host_memory.reexec_with_default_malloc()


def add_malloc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--malloc",
        choices=["hugepages", "default"],
        default="hugepages",
        help="hugepages: glibc.malloc.hugetlb=1, as train.py runs (jaxvae/host_memory.py); "
        "default: glibc's default malloc",
    )


def load_config(
    name: str,
    batch_size: int | None = None,
    conv_impl: str | None = None,
    dtype: str | None = None,
):
    """The experiment config of ``CONFIGS[name]``, with the given fields overridden."""
    from jaxvae import config_utils

    config = config_utils.load_config_file(ROOT / "configs" / CONFIGS[name])
    if batch_size:
        config.batch_size = batch_size
    if conv_impl:
        config.model.conv_impl = conv_impl
    if dtype:
        config.model.dtype = dtype
    return config


def image_shape(config) -> tuple[int, int, int]:
    """(H, W, C) of the config's data without touching the dataset."""
    size = config.data.image_size
    if config.data.name in ("mnist", "fashion_mnist", "binarized_mnist"):
        return (size or 28, size or 28, 1)
    if config.data.name == "cifar10":
        return (size or 32, size or 32, 3)
    return (size, size, 3)


def random_images(config, key, shape) -> Any:
    """Images in the data's range: {0, 1} for Bernoulli, [-1, 1] (or [0, 1]) for Gaussian."""
    import jax

    if config.model.likelihood == "bernoulli":
        return jax.random.bernoulli(key, 0.3, shape).astype("float32")
    low = -1.0 if config.data.pixel_range == "symmetric" else 0.0
    return jax.random.uniform(key, shape, minval=low, maxval=1.0)


class TrainBench:
    """A compiled train step, its state and device-resident batches; ``run(n)`` times n steps."""

    def __init__(self, config, num_devices: int = 1, num_batches: int = 2):
        import jax

        from jaxvae import mesh as mesh_lib
        from jaxvae import optim, train_state, train_step

        self.config = config
        devices = jax.devices()[:num_devices]
        if len(devices) < num_devices:
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} available")
        mesh = mesh_lib.make_mesh(devices)
        shape = image_shape(config)
        model = train_state.build_model(config, shape)
        tx, _ = optim.create_optimizer(config.optimizer, config.num_train_steps, 1000)
        self.state = mesh_lib.replicate(train_state.init_train_state(model, tx, config.seed), mesh)
        keys = jax.random.split(jax.random.key(1), num_batches)
        self.batches = [
            mesh_lib.shard_batch(
                jax.device_get(random_images(config, k, (config.batch_size, *shape))), mesh
            )
            for k in keys
        ]
        step = train_step.make_train_step(model, tx, config, mesh)
        t0 = time.perf_counter()
        self.step = step.lower(self.state, self.batches[0]).compile()
        self.compile_s = time.perf_counter() - t0
        self.peak_after_compile_mib = peak_memory()["peak_device_mib"]
        self.batch_size = config.batch_size
        self._i = 0

    def run(self, num_steps: int) -> float:
        """Runs ``num_steps`` steps; returns images/s (one host sync, at the end)."""
        import jax

        t0 = time.perf_counter()
        for _ in range(num_steps):
            self.state, metrics = self.step(self.state, self.batches[self._i % len(self.batches)])
            self._i += 1
        jax.block_until_ready(self.state)
        return num_steps * self.batch_size / (time.perf_counter() - t0)


class EvalBench:
    """The jaxvae.evaluate step (ELBO + IWAE) on one batch; ``run(n)`` -> samples/s."""

    def __init__(
        self, config, num_devices: int, iwae_samples: int, iwae_chunk: int, memory_mb: float
    ):
        import jax

        from jaxvae import evaluate, train_state
        from jaxvae import mesh as mesh_lib

        config.eval.iwae_samples = iwae_samples
        config.eval.iwae_chunk_size = iwae_chunk
        config.eval.memory_mb = memory_mb
        devices = jax.devices()[:num_devices]
        mesh = mesh_lib.make_mesh(devices)
        shape = image_shape(config)
        model = train_state.build_model(config, shape)
        variables = model.init(
            {"params": jax.random.key(0)}, jax.numpy.zeros((1, *shape)), jax.random.key(0)
        )
        self.variables = mesh_lib.replicate(variables, mesh)
        batch = config.eval.batch_size
        images = jax.device_get(random_images(config, jax.random.key(2), (batch, *shape)))
        self.images = mesh_lib.shard_batch(images, mesh)
        self.mask = mesh_lib.shard_batch(jax.numpy.ones((batch,), bool), mesh)
        self.key, self.offset = jax.random.key(3), jax.numpy.int32(0)
        t0 = time.perf_counter()
        step = evaluate.make_eval_step(model, config, mesh)
        args = (self.variables, self.images, self.mask, self.key, self.offset)
        self.step = step.lower(*args).compile()
        self.compile_s = time.perf_counter() - t0
        self.peak_after_compile_mib = peak_memory()["peak_device_mib"]
        self.samples_per_call = iwae_samples * batch
        self.plan = evaluate.make_iwae_planner(model, config)(batch // num_devices)

    def run(self, num_steps: int) -> float:
        import jax

        t0 = time.perf_counter()
        for _ in range(num_steps):
            out = self.step(self.variables, self.images, self.mask, self.key, self.offset)
        jax.block_until_ready(out)
        return num_steps * self.samples_per_call / (time.perf_counter() - t0)


def peak_memory() -> dict[str, float | None]:
    """Peak process RSS (MiB) and, where reported, peak device memory (MiB)."""
    import jax

    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"peak_rss_mib": rss, "peak_device_mib": peak / 2**20 if peak else None}


def measure(bench, warmup: int, windows: int, steps: int) -> dict[str, Any]:
    import numpy as np

    bench.run(warmup)
    rates = [bench.run(steps) for _ in range(windows)]
    return {"rate_median": float(np.median(rates)), "rates": rates}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), nargs="+", default=["seed", "mnist"])
    p.add_argument("--batch-size", type=int, help="global batch (default: the config's)")
    p.add_argument("--num-devices", type=int, default=1)
    p.add_argument(
        "--conv-impl",
        nargs="+",
        default=["auto"],
        help="jaxvae.layers impl(s): auto | xla | gemm",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["float32"],
        help="config.model.dtype(s): float32 | bfloat16 (the compute dtype)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--eval", action="store_true", help="benchmark the IWAE evaluation instead")
    p.add_argument("--iwae-samples", type=int, default=5000)
    p.add_argument(
        "--iwae-chunk", type=int, default=0, help="cap on samples per call (0: memory decides)"
    )
    p.add_argument("--memory-mb", type=float, default=512.0, help="config.eval.memory_mb")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--json", type=str, help="write the results to this JSON file")
    add_malloc_flag(p)
    args = p.parse_args(argv)

    set_malloc(args.malloc)
    _set_host_devices(args.num_devices)
    import jax

    from jaxvae import host_memory, layers

    rows = []
    runs = [(n, i, d) for n in args.config for i in args.conv_impl for d in args.dtype]
    for name, impl, dtype in runs:
        config = load_config(name, args.batch_size, impl, dtype)
        if args.eval:
            config.eval.batch_size = args.eval_batch_size
            bench = EvalBench(
                config, args.num_devices, args.iwae_samples, args.iwae_chunk, args.memory_mb
            )
            unit = "samples/s"
        else:
            bench = TrainBench(config, args.num_devices)
            unit = "images/s"
        m = measure(bench, args.warmup, args.windows, args.steps)
        row = {
            "config": name,
            "benchmark": "eval_iwae" if args.eval else "train_step",
            "backend": jax.default_backend(),
            "num_devices": args.num_devices,
            "batch_size": config.eval.batch_size if args.eval else config.batch_size,
            "conv_impl": impl,
            "resolved_impl": layers.resolve_impl(impl),
            "dtype": dtype,
            "unit": unit,
            "rate": m["rate_median"],
            "rates": m["rates"],
            "compile_s": bench.compile_s,
            # GPU: XLA's autotuning of convolutions during compilation allocates memory too
            "peak_device_mib_after_compile": bench.peak_after_compile_mib,
            "hugepage_malloc": host_memory.hugepages_active(),
            **peak_memory(),
        }
        if args.eval:
            chunk, rows_ = bench.plan
            row.update(
                iwae_samples=args.iwae_samples,
                iwae_chunk=args.iwae_chunk,
                memory_mb=args.memory_mb,
                plan_chunk=chunk,
                plan_rows=rows_,
            )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "rates"}), flush=True)

    print(f"\nmalloc: {args.malloc} (glibc.malloc.hugetlb={int(host_memory.hugepages_active())})")
    hdr = f"{'config':20s} {'bench':10s} {'impl':13s} {'dtype':8s} {'dev':>3s} {'batch':>5s} "
    hdr += (
        f"{'rate':>10s} {'unit':9s} {'compile_s':>9s} {'peak_rss_MiB':>12s} {'peak_dev_MiB':>12s}"
    )
    print(hdr)
    for r in rows:
        dev = f"{r['peak_device_mib']:.0f}" if r["peak_device_mib"] else "n/a"
        impl_col = f"{r['conv_impl']}/{r['resolved_impl']}"
        print(
            f"{r['config']:20s} {r['benchmark']:10s} {impl_col:13s} {r['dtype']:8s} "
            f"{r['num_devices']:3d} {r['batch_size']:5d} {r['rate']:10.1f} {r['unit']:9s} "
            f"{r['compile_s']:9.1f} {r['peak_rss_mib']:12.0f} {dev:>12s}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
