"""Time from ``python train.py`` to its first logged step, on a first and a second start.

Runs ``train.py`` twice with the same persistent compilation cache (``JAXVAE_COMPILATION_CACHE``,
a fresh temporary folder unless ``--cache`` names one), each time in a fresh workdir, and
prints for each start: seconds to the first ``step N/M`` line, the seconds XLA spent compiling
programs or loading them from the cache before it and in the whole run (JAX's
``/jax/core/compile/backend_compile_duration`` events, summed in the child), and the number of
programs compiled (cache misses). The first start fills the cache, the second should compile
nothing.

    python benchmarks/startup.py -- --config configs/mnist.py \\
        --config.data.data_dir=/tmp/tfds --config.data.manual_dir=../shared/data/mnist

Prepare the dataset before (one run of ``train.py``), so neither start pays for it. The
children run with ``JAXVAE_HUGEPAGES=0`` (no malloc restart, whose second interpreter start
would drop the compile-time counter).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_MARK = "[startup-bench] compiled"


def child(train_args: list[str]) -> None:
    """Runs train.py in this process, printing the running compile total after each compile."""
    import atexit
    import runpy

    import jax

    totals = {"seconds": 0.0, "count": 0}

    def report() -> None:
        print(f"{_MARK} {totals['count']} {totals['seconds']:.3f}", file=sys.stderr, flush=True)

    def on_duration(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":  # a compile or a cache load
            totals["seconds"] += duration
            report()

    def on_event(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_misses":
            totals["count"] += 1
            report()

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    atexit.register(lambda: print(f"{_MARK} total", file=sys.stderr, flush=True))
    sys.argv = [str(ROOT / "train.py"), *train_args]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def start(train_args: list[str], cache: Path, workdir: Path) -> dict[str, float]:
    env = {**os.environ, "JAXVAE_COMPILATION_CACHE": str(cache), "JAXVAE_HUGEPAGES": "0"}
    argv = [sys.executable, __file__, "--child", "--", *train_args, "--workdir", str(workdir)]
    argv += ["--config.log_every_steps=1"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = {"first_step_s": float("nan"), "compile_before_s": 0.0, "compiles_before": 0}
    count, seconds = 0, 0.0
    for line in proc.stdout:
        if line.startswith(_MARK) and not line.strip().endswith("total"):
            _, _, n, s = line.rsplit(" ", 3)
            count, seconds = int(n), float(s)
        elif re.match(r"^step \d+/\d+", line) and out["first_step_s"] != out["first_step_s"]:
            out.update(
                first_step_s=time.perf_counter() - t0,
                compile_before_s=seconds,
                compiles_before=count,
            )
        elif line.startswith("error:"):
            print(line, end="", file=sys.stderr)
    code = proc.wait()
    out.update(total_s=time.perf_counter() - t0, compile_total_s=seconds, compiles=count)
    if code:
        raise SystemExit(f"train.py exited with {code}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help="compilation cache folder (default: a fresh one)")
    p.add_argument("--steps", type=int, default=3, help="--config.num_train_steps of each run")
    p.add_argument("train_args", nargs="*", help="train.py's arguments (after --)")
    args = p.parse_args()
    if args.child:
        child(args.train_args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        train_args = [*args.train_args, f"--config.num_train_steps={args.steps}"]
        rows = [start(train_args, cache, Path(tmp) / f"wd{i}") for i in (1, 2)]
    print(
        f"{'start':6s} {'first step s':>12s} {'compile s':>10s} {'programs':>8s} "
        f"{'| whole run s':>13s} {'compile s':>10s} {'programs':>8s}"
    )
    for i, r in enumerate(rows, 1):
        print(
            f"{i:<6d} {r['first_step_s']:12.1f} {r['compile_before_s']:10.2f} "
            f"{r['compiles_before']:8d} | {r['total_s']:11.1f} {r['compile_total_s']:10.2f} "
            f"{r['compiles']:8d}"
        )


if __name__ == "__main__":
    main()
