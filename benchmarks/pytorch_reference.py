"""A PyTorch VanillaVAE and its training step, raced against jaxvae in the same process.

The PyTorch model is written here from the architecture of PyTorch-VAE's ``VanillaVAE``
(NCHW): ``len(hidden_dims)`` blocks ``Conv2d(k3, s2, p1) -> BatchNorm2d -> LeakyReLU``,
flatten, ``fc_mu`` / ``fc_var``; ``decoder_input`` Linear, blocks
``ConvTranspose2d(k3, s2, p1, output_padding=1) -> BatchNorm2d -> LeakyReLU``, and the final
``ConvTranspose2d -> BatchNorm2d -> LeakyReLU -> Conv2d(k3, p1) -> [Tanh]``. Like jaxvae, a side
that is not divisible by ``2 ** len(hidden_dims)`` (MNIST's 28) is handled by ``ceil`` halving
in the encoder and cropping the decoder's surplus before the final BatchNorm.

Training step (what each timed step does, in both frameworks): forward, the objective,
backward, Adam update.

- seed config (64x64x3, Gaussian/tanh): PyTorch-VAE's loss, pixel-mean MSE +
  ``kld_weight`` * batch-mean KL (``configs/celeba.py``: ``vanilla_vae_loss``).
- MNIST config (28x28x1, Bernoulli): the negative ELBO per example (binary cross-entropy on
  logits summed over pixels + KL), batch mean (``configs/mnist.py``: ``elbo``).

The driver alternates JAX and PyTorch windows (J T J T ...) in one process, with the same
shapes and the same thread count, and reports each side's median images/s and the median of
the per-pair ratios.

Mixed precision: ``--dtypes float32 bfloat16`` races each side in both. jaxvae's bfloat16 is
``config.model.dtype = "bfloat16"`` (``jaxvae.models``: bfloat16 convolutions, matmuls and
activations; float32 parameters, BatchNorm statistics and losses); PyTorch's is the usual
``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward pass, with the outputs cast
to float32 for the loss (as jaxvae does) and the backward pass outside the context.
``--gemm N`` first times an ``N x N x N`` matmul in float32 and bfloat16 in both frameworks
(GFLOP/s), which says whether the CPU has a native bfloat16 path (AVX512_BF16 / AMX).

Threads: ``--threads N`` calls ``torch.set_num_threads(N)``; XLA's CPU client sizes its
intra-op pool to the machine's cores and has no flag to set its size, so the comparison is
fair when N equals the core count (the default, ``os.cpu_count()``); for N == 1 the driver
sets ``--xla_cpu_multi_thread_eigen=false`` (XLA single-threaded) before JAX starts.
Neither side is given the other's thread pool while it runs: windows never overlap.

    python benchmarks/pytorch_reference.py --config seed
    python benchmarks/pytorch_reference.py --config seed mnist --windows 7 --json race.json
    python benchmarks/pytorch_reference.py --config seed mnist --dtypes float32 bfloat16 --gemm 2048

torch is an optional benchmark dependency (``pip install torch``); jaxvae never imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import add_malloc_flag, set_malloc  # noqa: E402  (imports no jax)


def build_torch_vae(torch, latent_dim, hidden_dims, image_shape, output_activation):
    """``VanillaVAE`` in PyTorch for images ``(H, W, C)`` (inputs NCHW)."""
    nn = torch.nn
    height, width, channels = image_shape

    def block(conv, c):
        return nn.Sequential(conv, nn.BatchNorm2d(c), nn.LeakyReLU())

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            dims = list(hidden_dims)
            b_h, b_w = height, width
            cin = channels
            enc = []
            for h in dims:
                enc.append(block(nn.Conv2d(cin, h, 3, stride=2, padding=1), h))
                cin, b_h, b_w = h, math.ceil(b_h / 2), math.ceil(b_w / 2)
            self.bottleneck = (dims[-1], b_h, b_w)
            self.encoder = nn.Sequential(*enc)
            flat = dims[-1] * b_h * b_w
            self.fc_mu = nn.Linear(flat, latent_dim)
            self.fc_var = nn.Linear(flat, latent_dim)
            self.decoder_input = nn.Linear(latent_dim, flat)
            rev = dims[::-1]
            self.decoder = nn.Sequential(
                *[
                    block(
                        nn.ConvTranspose2d(rev[i], rev[i + 1], 3, 2, 1, output_padding=1),
                        rev[i + 1],
                    )
                    for i in range(len(rev) - 1)
                ]
            )
            self.final_up = nn.ConvTranspose2d(rev[-1], rev[-1], 3, 2, 1, output_padding=1)
            self.final_bn = nn.BatchNorm2d(rev[-1])
            self.final_conv = nn.Conv2d(rev[-1], channels, 3, padding=1)
            self.tanh = output_activation == "tanh"

        def forward(self, x, eps):
            h = torch.flatten(self.encoder(x), start_dim=1)
            mu, log_var = self.fc_mu(h), self.fc_var(h)
            z = mu + torch.exp(0.5 * log_var) * eps
            h = self.decoder_input(z).view(-1, *self.bottleneck)
            h = self.final_up(self.decoder(h))[:, :, :height, :width]
            h = self.final_conv(torch.nn.functional.leaky_relu(self.final_bn(h)))
            return (torch.tanh(h) if self.tanh else h), mu, log_var

    return VAE()


class TorchBench:
    """PyTorch model + Adam + two fixed batches; ``run(n)`` -> images/s."""

    def __init__(
        self,
        torch,
        config,
        image_shape,
        channels_last: bool,
        seed: int = 0,
        autocast_bf16: bool = False,
    ):
        torch.manual_seed(seed)
        self.autocast_bf16 = autocast_bf16
        m = config.model
        self.torch = torch
        self.model = build_torch_vae(
            torch,
            m.latent_dim,
            m.hidden_dims,
            image_shape,
            m.output_activation if m.likelihood == "gaussian" else "none",
        )
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.optimizer.learning_rate)
        self.batch_size = config.batch_size
        self.latent_dim = m.latent_dim
        self.likelihood = m.likelihood
        self.objective = config.objective
        self.kld_weight = config.kld_weight
        h, w, c = image_shape
        gen = torch.Generator().manual_seed(seed)
        if m.likelihood == "bernoulli":
            make = lambda: (torch.rand(self.batch_size, c, h, w, generator=gen) < 0.3).float()
        else:
            make = lambda: torch.rand(self.batch_size, c, h, w, generator=gen) * 2 - 1
        self.batches = [make().contiguous(memory_format=fmt) for _ in range(2)]
        self._i = 0

    def step(self, x):
        torch = self.torch
        F = torch.nn.functional
        eps = torch.randn(x.shape[0], self.latent_dim)
        if self.autocast_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, mu, log_var = self.model(x, eps)
            out, mu, log_var = out.float(), mu.float(), log_var.float()
        else:
            out, mu, log_var = self.model(x, eps)
        kl = -0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1)
        if self.objective == "vanilla_vae_loss":
            recon = torch.sigmoid(out) if self.likelihood == "bernoulli" else out
            loss = F.mse_loss(recon, x) + self.kld_weight * kl.mean()
        else:
            if self.likelihood == "bernoulli":
                nll = F.binary_cross_entropy_with_logits(out, x, reduction="none")
            else:  # unit-variance Gaussian
                nll = 0.5 * ((x - out) ** 2 + math.log(2 * math.pi))
            loss = (nll.sum(dim=(1, 2, 3)) + kl).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def run(self, num_steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            loss = self.step(self.batches[self._i % 2])
            self._i += 1
        float(loss.detach())  # eager already; mirrors the JAX side's final sync
        return num_steps * self.batch_size / (time.perf_counter() - t0)


def _key(side: str, dtype: str) -> str:
    """Bench name: ``jax`` / ``torch_nchw`` for float32 (the names of the float32-only race),
    ``..._bf16`` for bfloat16."""
    return side if dtype == "float32" else f"{side}_bf16"


def gemm_rates(torch, n: int, threads: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an ``n x n @ n x n`` matmul, best of ``repeats``, per framework and dtype.

    jax: ``jit(a @ b)`` on device-resident operands; torch: ``a @ b`` with ``threads`` threads.
    Both in one process, one after the other. A first PyTorch call slower than 2 s is the
    measurement (PyTorch's bfloat16 matmul on a CPU without native bfloat16 can run at well
    under 1 GFLOP/s).
    """
    import jax
    import jax.numpy as jnp

    def best_time(call, *, slow_first_call_counts: bool) -> float:
        t0 = time.perf_counter()
        call()  # warm-up (compiles the jax side)
        first = time.perf_counter() - t0
        if slow_first_call_counts and first > 2.0:
            return first  # no native bfloat16: one call is enough to see it
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
        return best

    matmul = jax.jit(lambda a, b: a @ b)
    flops = 2.0 * n**3
    out = {}
    for dtype in ("float32", "bfloat16"):
        keys = jax.random.split(jax.random.key(0))
        a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in keys)
        jax_call = lambda: matmul(a, b).block_until_ready()  # noqa: B023 (called right here)
        out[f"jax_{dtype}"] = flops / best_time(jax_call, slow_first_call_counts=False) / 1e9
        ta, tb = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
        torch_call = lambda: torch.matmul(ta, tb)  # noqa: B023
        out[f"torch_{dtype}"] = flops / best_time(torch_call, slow_first_call_counts=True) / 1e9
    out["threads"] = threads
    return out


def race(benches: dict, warmup: int, windows: int, steps: int) -> dict[str, list[float]]:
    """Alternates ``steps``-step windows of every bench, ``windows`` rounds; images/s per window."""
    for b in benches.values():
        b.run(warmup)
    rates = {k: [] for k in benches}
    for _ in range(windows):
        for k, b in benches.items():
            rates[k].append(b.run(steps))
    return rates


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", nargs="+", choices=["seed", "mnist"], default=["seed", "mnist"])
    p.add_argument("--batch-size", type=int, help="default: the config's")
    p.add_argument("--conv-impl", default="auto", help="jaxvae.layers impl for the JAX side")
    p.add_argument(
        "--torch-layouts",
        nargs="+",
        choices=["nchw", "channels_last"],
        default=["nchw", "channels_last"],
    )
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="steps per window")
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=["float32"],
        help="compute dtypes raced on both sides (bfloat16: jaxvae's config.model.dtype, "
        "PyTorch's autocast)",
    )
    p.add_argument(
        "--gemm", type=int, default=0, help="first time an N^3 matmul per framework and dtype"
    )
    p.add_argument("--json", type=str)
    add_malloc_flag(p)
    args = p.parse_args(argv)
    set_malloc(args.malloc)  # one malloc for both sides: they share the process

    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        )
    import torch

    torch.set_num_threads(args.threads)
    import jax
    from throughput import TrainBench, image_shape, load_config

    from jaxvae import host_memory

    if args.gemm:
        gemm = gemm_rates(torch, args.gemm, args.threads)
        print(json.dumps({"gemm_gflops": gemm, "n": args.gemm}), flush=True)

    results = []
    for name in args.config:
        config = load_config(name, args.batch_size, args.conv_impl)
        shape = image_shape(config)
        benches, compile_s = {}, {}
        for dtype in args.dtypes:
            config.model.dtype = dtype
            jax_bench = TrainBench(config)
            benches[_key("jax", dtype)] = jax_bench
            compile_s[dtype] = jax_bench.compile_s
        for dtype in args.dtypes:
            for layout in args.torch_layouts:
                benches[_key(f"torch_{layout}", dtype)] = TorchBench(
                    torch,
                    config,
                    shape,
                    layout == "channels_last",
                    autocast_bf16=dtype == "bfloat16",
                )
        rates = race(benches, args.warmup, args.windows, args.steps)
        row = {
            "config": name,
            "batch_size": config.batch_size,
            "image_shape": shape,
            "threads": args.threads,
            "jax_backend": jax.default_backend(),
            "conv_impl": args.conv_impl,
            "dtypes": args.dtypes,
            "jax_compile_s": compile_s,
            "torch_version": torch.__version__,
            "hugepage_malloc": host_memory.hugepages_active(),
            "images_per_s": {k: float(np.median(v)) for k, v in rates.items()},
            "windows": rates,
        }
        for jax_dtype in args.dtypes:
            for torch_dtype in args.dtypes:
                for layout in args.torch_layouts:
                    j, t = _key("jax", jax_dtype), _key(f"torch_{layout}", torch_dtype)
                    pairs = np.array(rates[j]) / np.array(rates[t])
                    row[f"ratio_{j}_over_{t}"] = float(np.median(pairs))
        results.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmalloc: {args.malloc} (glibc.malloc.hugetlb={int(host_memory.hugepages_active())})")
    for r in results:
        print(f"\n{r['config']} (batch {r['batch_size']}, {r['threads']} threads), images/s:")
        for k, v in r["images_per_s"].items():
            print(f"  {k:28s} {v:8.1f}")
        for k, v in r.items():
            if k.startswith("ratio_"):
                print(f"  {k[len('ratio_') :]:50s} {v:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
