"""How much a fresh output buffer costs on this machine: XLA writing 75 MB, new vs donated.

A jitted ``z * 2`` over a 75 MB array, timed (median of ``--repeats``) two ways: writing a new
output buffer (XLA's CPU client mallocs it; glibc maps fresh pages, and every page is faulted
in on first write) and writing into the donated input (pages already mapped). The gap is the
cost of page faults, which every step of a jitted training loop pays for its temporaries.
Run it with both mallocs to see what ``jaxvae.host_memory`` buys here:

    python benchmarks/alloc_probe.py                    # as train.py runs (huge-page malloc)
    python benchmarks/alloc_probe.py --malloc default
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import add_malloc_flag, set_malloc  # noqa: E402  (imports no jax)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mbytes", type=float, default=75.0)
    p.add_argument("--repeats", type=int, default=15)
    add_malloc_flag(p)
    args = p.parse_args()
    set_malloc(args.malloc)

    import jax
    import jax.numpy as jnp

    from jaxvae import host_memory

    n = int(args.mbytes * 1e6 / 4)
    z = jax.random.normal(jax.random.PRNGKey(0), (n,))
    new_buffer = jax.jit(lambda a: a * 2.0)
    in_place = jax.jit(lambda a: a * 2.0, donate_argnums=0)

    def median_ms(fn, fresh_input: bool) -> float:
        times = []
        for _ in range(args.repeats + 1):
            a = jnp.copy(z) if fresh_input else z
            jax.block_until_ready(a)
            t = time.perf_counter()
            jax.block_until_ready(fn(a))
            times.append(time.perf_counter() - t)
        times = sorted(times[1:])  # the first call compiles
        return 1e3 * times[len(times) // 2]

    t_new, t_donated = median_ms(new_buffer, False), median_ms(in_place, True)
    gb = 2 * n * 4 / 1e9  # read + write
    print(f"backend {jax.default_backend()}, malloc {args.malloc} ", end="")
    print(f"(glibc.malloc.hugetlb={int(host_memory.hugepages_active())}), {args.mbytes:.0f} MB:")
    print(f"  new output buffer     {t_new:7.2f} ms  {gb / t_new * 1e3:5.1f} GB/s")
    print(f"  donated input buffer  {t_donated:7.2f} ms  {gb / t_donated * 1e3:5.1f} GB/s")


if __name__ == "__main__":
    main()
