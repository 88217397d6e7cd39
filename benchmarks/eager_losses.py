"""Eager call times of every public function of ``jaxvae.losses`` (no ``jit`` around them).

A researcher calling the losses from a notebook or a script pays, per call, the op-by-op
dispatch of its arithmetic; a function that re-traced or re-compiled something on every call
would cost far more. For each function this prints the median wall time of ``--calls`` eager
calls (after one warm-up call, which compiles the individual ops) next to the same call
jitted (compiled once), for ``--batch`` examples, ``--samples`` K and a small MLP decoder.

    python benchmarks/eager_losses.py
    python benchmarks/eager_losses.py --batch 8 --samples 10 --calls 20
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=10, help="K of the IWAE functions")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--pixels", type=int, default=784)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxvae import losses

    b, d, n, k = args.batch, args.latent, args.pixels, args.samples
    keys = jax.random.split(jax.random.key(0), 6)
    w1 = jax.random.normal(keys[0], (d, 256)) / d**0.5
    w2 = jax.random.normal(keys[1], (256, n)) / 16.0

    def decode(z):
        return jnp.tanh(z @ w1) @ w2

    def ll(x, out):
        return losses.bernoulli_log_likelihood(x, out, event_ndim=1)

    x = (jax.random.uniform(keys[2], (b, n)) < 0.3).astype(jnp.float32)
    mean = jax.random.normal(keys[3], (b, d))
    logvar = 0.1 * jax.random.normal(keys[4], (b, d))
    key = keys[5]
    eps = jax.random.normal(key, (k, b, d))
    recon = jax.nn.sigmoid(decode(mean))
    cases = {
        "reparameterize": lambda: losses.reparameterize(key, mean, logvar, num_samples=k),
        "example_keys": lambda: losses.example_keys(key, b),
        "gaussian_kl": lambda: losses.gaussian_kl(mean, logvar),
        "gaussian_log_density": lambda: losses.gaussian_log_density(mean, mean, logvar),
        "bernoulli_log_likelihood": lambda: ll(x, decode(mean)),
        "gaussian_log_likelihood": lambda: losses.gaussian_log_likelihood(
            x, recon, 0.0, event_ndim=1
        ),
        "mc_reconstruction": lambda: losses.mc_reconstruction(
            key, decode, x, mean, logvar, ll, num_samples=k
        ),
        "elbo": lambda: losses.elbo(key, decode, x, mean, logvar, ll),
        "log_importance_weights": lambda: losses.log_importance_weights(
            decode, x, mean, logvar, eps, ll
        ),
        "iwae_bound": lambda: losses.iwae_bound(key, decode, x, mean, logvar, ll, num_samples=k),
        "iwae_log_likelihood": lambda: losses.iwae_log_likelihood(
            key, decode, x, mean, logvar, ll, num_samples=k
        ),
        "iwae_log_likelihood (K=1000, chunks of 64)": lambda: losses.iwae_log_likelihood(
            key, decode, x, mean, logvar, ll, num_samples=1000, chunk_size=64
        ),
        "bits_per_dim": lambda: losses.bits_per_dim(100.0, num_dims=n),
        "vanilla_vae_loss": lambda: losses.vanilla_vae_loss(
            recon, x, mean, logvar, kld_weight=0.00025
        ),
    }

    def median_ms(fn) -> float:
        jax.block_until_ready(fn())  # warm-up
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    print(f"jax {jax.__version__} on {jax.default_backend()}: B={b}, D={d}, K={k}, {n} pixels")
    print(f"{'function':45s} {'eager ms':>9s} {'jitted ms':>9s}")
    for name, fn in cases.items():
        eager = median_ms(fn)
        jitted = median_ms(jax.jit(fn))
        print(f"{name:45s} {eager:9.2f} {jitted:9.2f}", flush=True)


if __name__ == "__main__":
    main()
