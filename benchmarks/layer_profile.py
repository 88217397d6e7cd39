"""Per-layer forward+backward timing of the seed VAE's strided convolutions.

Times ``grad`` of ``sum(layer(x) * g)`` w.r.t. (x, kernel) for every strided layer of
the seed architecture (64x64x3 input, hidden dims 32..512), for each conv formulation,
so one can see which layers bound the training step.

    python benchmarks/layer_profile.py --batch-size 64 --impls xla gemm
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvae import layers


def seed_layers(
    image: int, channels: int, hidden: tuple[int, ...]
) -> list[tuple[str, tuple, tuple]]:
    """[(kind, x_shape_without_batch, kernel_shape)] for every strided layer."""
    out = []
    size, cin = image, channels
    for h in hidden:
        out.append(("conv", (size, size, cin), (3, 3, cin, h)))
        size, cin = -(-size // 2), h
    rev = hidden[::-1]
    for i in range(len(rev)):
        cout = rev[i + 1] if i + 1 < len(rev) else rev[-1]
        out.append(("convT", (size, size, cin), (3, 3, cout, cin)))
        size, cin = 2 * size, cout
    return out


def time_fn(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--impls", nargs="+", default=["xla", "gemm"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, nargs="*", help="indices of the layers to time (all)")
    args = p.parse_args()
    fns = {
        "conv": {i: getattr(layers, f"conv3x3_stride2_{i}") for i in layers.IMPLS[1:]},
        "convT": {i: getattr(layers, f"conv_transpose3x3_stride2_{i}") for i in layers.IMPLS[1:]},
    }
    key = jax.random.key(0)
    totals = dict.fromkeys(args.impls, 0.0)
    print(f"{'layer':8s} {'x':>16s} {'kernel':>18s} " + " ".join(f"{i:>10s}" for i in args.impls))
    for idx, (kind, xs, ks) in enumerate(seed_layers(64, 3, (32, 64, 128, 256, 512))):
        if args.layers and idx not in args.layers:
            continue
        x = jax.random.normal(key, (args.batch_size, *xs))
        k = jax.random.normal(key, ks) * 0.05
        row = []
        for impl in args.impls:
            f = fns[kind][impl]
            y = f(x, k)
            g = jax.random.normal(key, y.shape)
            # g is an argument, not a closure constant, so XLA cannot constant-fold it.
            step = jax.jit(jax.grad(lambda x, k, g, f=f: jnp.sum(f(x, k) * g), argnums=(0, 1)))
            t = time_fn(step, (x, k, g), args.repeats)
            totals[impl] += t
            row.append(f"{1e3 * t:9.2f}ms")
        print(f"{kind:8s} {str(xs):>16s} {str(ks):>18s} " + " ".join(row))
    print(f"{'total':44s} " + " ".join(f"{1e3 * totals[i]:9.2f}ms" for i in args.impls))


if __name__ == "__main__":
    main()
