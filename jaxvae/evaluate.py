"""Evaluation over a whole split, data-parallel: negative ELBO, KL, reconstruction, IWAE NLL.

The eval batch is sharded over the ``"data"`` mesh axis like the training batch; per-example
values are masked (the last batch of a split is padded, its ``mask`` is False on padding), summed
on each device and ``psum``-ed, so every real example counts exactly once.

Memory. The IWAE estimate decodes ``K`` samples of every example; one decoder call holds the
activations of all the samples it decodes. :func:`iwae_plan` sizes the calls from
``config.eval.memory_mb`` (per device) and the decoder's bytes per sample, measured from its
traced program: ``chunk`` samples of all local examples per call, or, when even one sample of
every local example does not fit, blocks of examples one sample at a time. No choice of ``K``,
``eval.iwae_chunk_size`` (an upper bound on ``chunk``) or eval batch size makes a call larger.
The estimate does not depend on the plan: ``losses.iwae_log_likelihood`` draws sample ``k`` of
every example from ``fold_in(key, k)`` whatever the chunking.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jaxvae import losses, models
from jaxvae.mesh import DATA_AXIS, shard_batch

SUM_KEYS = ("neg_elbo", "reconstruction", "kl", "nll_iwae", "count")


def _intermediate_bytes(jaxpr: Any) -> int:
    """Sum of the sizes of every value a jaxpr computes, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = getattr(v, "aval", None)
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    total += _intermediate_bytes(inner)
    return total


def decoder_bytes_per_sample(model: models.VAE, variables: Any, log_likelihood_fn) -> int:
    """Bytes one decoded sample adds to a decoder call (decode + log-likelihood, eval mode).

    The sum of every intermediate of the traced program for 2 samples minus that for 1, so
    per-call constants (rearranged kernels) cancel. An upper bound on the live memory (XLA
    fuses and reuses buffers), which keeps a budget derived from it on the safe side.
    ``variables`` may be abstract (``jax.ShapeDtypeStruct`` leaves).
    """

    def per_batch(n: int) -> int:
        def fn(v, z, x):
            return log_likelihood_fn(x, model.apply(v, z, train=False, method="decode"))

        z = jax.ShapeDtypeStruct((n, model.latent_dim), jnp.float32)
        x = jax.ShapeDtypeStruct((n, *model.image_shape), jnp.float32)
        return _intermediate_bytes(jax.make_jaxpr(fn)(variables, z, x).jaxpr)

    return max(1, per_batch(2) - per_batch(1))


def iwae_plan(
    local_batch: int, num_samples: int, bytes_per_sample: int, memory_mb: float, max_chunk: int
) -> tuple[int, int | None]:
    """``(chunk, rows)`` for ``losses.iwae_log_likelihood`` on one device.

    ``chunk`` samples of ``rows`` examples per decoder call (``rows=None``: all ``local_batch``),
    at most ``memory_mb`` MiB of decoder working set; ``max_chunk > 0`` caps ``chunk``.
    """
    budget = max(1, int(memory_mb * 2**20) // bytes_per_sample)  # samples per call
    if budget < local_batch:
        return 1, budget
    chunk = min(num_samples, budget // local_batch)
    if max_chunk > 0:
        chunk = min(chunk, max_chunk)
    return max(1, chunk), None


def make_iwae_planner(
    model: models.VAE, config: ml_collections.ConfigDict
) -> Callable[[int], tuple[int, int | None]]:
    """``plan(local_batch) -> (chunk, rows)``: :func:`iwae_plan` for ``model`` and
    ``config.eval`` (the decoder's bytes per sample are traced once, here)."""
    log_likelihood_fn = models.make_log_likelihood_fn(
        config.model.likelihood, config.model.obs_logvar
    )
    per_sample = decoder_bytes_per_sample(model, abstract_variables(model), log_likelihood_fn)
    ev = config.eval
    return lambda local_batch: iwae_plan(
        local_batch, ev.iwae_samples, per_sample, ev.memory_mb, ev.iwae_chunk_size
    )


def make_eval_step(
    model: models.VAE, config: ml_collections.ConfigDict, mesh: Mesh
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]:
    """``eval_step(variables, images [B,H,W,C], mask [B], key) -> sums`` (replicated scalars).

    ``sums`` holds the masked sums over the global batch of ``-ELBO``, ``E_q log p(x|z)``,
    ``KL`` and ``-log p_IWAE(x)`` (K = ``config.eval.iwae_samples``), and ``count``. Each device
    draws its noise from ``fold_in(key, device index)``. The IWAE decoder calls are sized by
    :func:`iwae_plan` from ``config.eval.memory_mb``.
    """
    log_likelihood_fn = models.make_log_likelihood_fn(
        config.model.likelihood, config.model.obs_logvar
    )
    num_samples = config.eval.iwae_samples
    plan = make_iwae_planner(model, config)

    def per_device(variables, images, mask, key):
        chunk, rows = plan(images.shape[0])
        key = jax.random.fold_in(key, lax.axis_index(DATA_AXIS))
        elbo_key, iwae_key = jax.random.split(key)
        mean, logvar = model.apply(variables, images, train=False, method="encode")

        def decode_fn(z):
            return model.apply(variables, z, train=False, method="decode")

        elbo, reconstruction, kl = losses.elbo(
            elbo_key, decode_fn, images, mean, logvar, log_likelihood_fn
        )
        log_px = losses.iwae_log_likelihood(
            iwae_key,
            decode_fn,
            images,
            mean,
            logvar,
            log_likelihood_fn,
            num_samples=num_samples,
            chunk_size=chunk,
            batch_chunk_size=rows,
        )
        w = mask.astype(jnp.float32)
        sums = {
            "neg_elbo": jnp.sum(-elbo * w),
            "reconstruction": jnp.sum(reconstruction * w),
            "kl": jnp.sum(kl * w),
            "nll_iwae": jnp.sum(-log_px * w),
            "count": jnp.sum(w),
        }
        return {k: lax.psum(v, DATA_AXIS) for k, v in sums.items()}

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(
            PartitionSpec(),
            PartitionSpec(DATA_AXIS),
            PartitionSpec(DATA_AXIS),
            PartitionSpec(),
        ),
        out_specs=PartitionSpec(),
    )
    return jax.jit(sharded)


def abstract_variables(model: models.VAE) -> Any:
    """``ShapeDtypeStruct`` tree of ``model``'s variables (nothing is computed)."""
    dummy = jnp.zeros((1, *model.image_shape), jnp.float32)
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), dummy, jax.random.PRNGKey(0), train=False)
    )


def evaluate(
    eval_step: Callable,
    variables: Any,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    key: jax.Array,
    num_dims: int,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Means over every real example of ``batches`` (this process's rows of each global batch).

    Returns ``neg_elbo``, ``reconstruction``, ``kl``, ``nll_iwae`` (nats per example),
    ``bits_per_dim`` (of the IWAE NLL, the tightest bound), ``bits_per_dim_elbo`` and
    ``num_examples``. Batch ``i`` uses the key ``fold_in(key, i)``, so an evaluation is
    deterministic given the key.

    ``progress(examples_done, seconds)``, when given, is called after each batch with the
    number of real examples evaluated so far (by all processes); it waits for that batch's
    result, which costs nothing next to a batch of an IWAE evaluation.
    """
    partial = []
    done = 0.0
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        images = shard_batch(np.asarray(batch["image"], np.float32), mesh)
        mask = shard_batch(np.asarray(batch["mask"], bool), mesh)
        partial.append(eval_step(variables, images, mask, jax.random.fold_in(key, i)))
        if progress is not None:
            done += float(partial[-1]["count"])
            progress(int(round(done)), time.perf_counter() - t0)
    if not partial:
        raise ValueError("the eval split yielded no batches")
    # One transfer at the end; sums in float64 on the host.
    host = jax.device_get(partial)
    totals = {k: math.fsum(float(p[k]) for p in host) for k in SUM_KEYS}
    n = totals["count"]
    if n <= 0:
        raise ValueError("the eval split has no real (unmasked) examples")
    out = {k: totals[k] / n for k in SUM_KEYS if k != "count"}
    out["bits_per_dim"] = float(losses.bits_per_dim(out["nll_iwae"], num_dims=num_dims))
    out["bits_per_dim_elbo"] = float(losses.bits_per_dim(out["neg_elbo"], num_dims=num_dims))
    out["num_examples"] = int(round(n))
    return out


def make_picture_fn(
    model: models.VAE, num_samples: int, interpolation_steps: int
) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
    """One jitted picture maker (eval mode, one device); every output is a mean image.

    ``pictures(variables, x [N,H,W,C], key) -> {"reconstructions": [N,H,W,C],
    "samples": [num_samples,H,W,C], "interpolation": [P, steps, H,W,C]}`` with ``P = N // 2``
    pairs ``(x[i], x[P + i])``: the decoded ``(1 - t) mu(x0) + t mu(x1)``, ``t`` in
    ``linspace(0, 1, steps)``. One function, so evaluation compiles one picture program.
    """

    @jax.jit
    def pictures(variables, x, key):
        reconstructions = model.apply(variables, x, method="reconstruct")
        samples = model.apply(variables, key, num_samples, method="sample")
        pairs = x.shape[0] // 2
        mean, _ = model.apply(variables, x[: 2 * pairs], train=False, method="encode")
        m0, m1 = mean[:pairs], mean[pairs:]
        t = jnp.linspace(0.0, 1.0, interpolation_steps)[None, :, None]
        z = (1.0 - t) * m0[:, None, :] + t * m1[:, None, :]  # [P, steps, D]
        outputs = model.apply(variables, z, train=False, method="decode")
        return {
            "reconstructions": reconstructions,
            "samples": samples,
            "interpolation": models.mean_image(model.likelihood, outputs),
        }

    return pictures


__all__ = [
    "SUM_KEYS",
    "abstract_variables",
    "decoder_bytes_per_sample",
    "evaluate",
    "iwae_plan",
    "make_eval_step",
    "make_iwae_planner",
    "make_picture_fn",
]
