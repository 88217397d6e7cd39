"""Evaluation over a whole split, data-parallel: negative ELBO, KL, reconstruction, IWAE NLL.

The eval batch is sharded over the ``"data"`` mesh axis like the training batch; per-example
values are masked (the last batch of a split is padded, its ``mask`` is False on padding), summed
on each device and ``psum``-ed, so every real example counts exactly once.

Noise: the rule of the training step. Example ``j`` of the split has the key ``fold_in(key, j)``
(``losses.example_keys``) and :mod:`jaxvae.losses` draws its noise from that key alone, so the
test metrics of a checkpoint do not depend on the eval batch size or on the number of devices or
processes that evaluate it (nor on the memory plan below).

This is the one place ``jax.shard_map`` remains: the memory plan blocks the examples of each
device (a ``lax.map`` over blocks of rows), which must run on that device's own rows; under
``jit`` over the global batch XLA would scan over the sharded axis and serialise the devices.

Memory. The IWAE estimate decodes ``K`` samples of every example; one decoder call holds the
activations of all the samples it decodes. :func:`iwae_plan` sizes the calls from
``config.eval.memory_mb`` (per device) and the decoder's bytes per sample, which XLA reports
for the compiled decoder (:func:`decoder_bytes_per_sample`): ``chunk`` samples of all local
examples per call, or, when even one sample of every local example does not fit, blocks of
examples one sample at a time (the ELBO's one sample per example too). No choice of ``K``,
``eval.iwae_chunk_size`` (an upper bound on ``chunk``) or eval batch size makes a call larger.
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


def decoder_bytes_per_sample(model: models.VAE, variables: Any, log_likelihood_fn) -> int:
    """Bytes one decoded sample adds to a decoder call (decode, log-likelihood and log prior,
    eval mode; the VampPrior holds ``M`` terms per sample, more than an MLP decoder's
    activations for thousands of components).

    XLA's own figure: the temporary buffers of the compiled program
    (``compile().memory_analysis()``) for 64 samples minus those for 32, per sample, so
    per-call constants cancel. ``variables`` may be abstract (``jax.ShapeDtypeStruct``
    leaves). Compiles two small programs (JAX's compilation cache keeps them).
    """

    # The VampPrior's components are inputs here: encoding the pseudo-inputs inside would add a
    # large per-call constant whose buffers XLA reuses for the samples' (measured: the
    # difference then fell below the decoder's own bytes per sample).
    components = jax.ShapeDtypeStruct((model.num_pseudo_inputs, model.latent_dim), jnp.float32)
    prior_args = (components, components) if model.prior == "vamp" else ()

    def temp_bytes(n: int) -> int:
        def fn(v, z, x, *prior_args):
            log_px_z = log_likelihood_fn(x, model.apply(v, z, train=False, method="decode"))
            if not prior_args:
                return log_px_z + losses.gaussian_log_density(z)
            return log_px_z + losses.mixture_gaussian_log_density(z, *prior_args)

        z = jax.ShapeDtypeStruct((n, model.latent_dim), jnp.float32)
        x = jax.ShapeDtypeStruct((n, *model.image_shape), jnp.float32)
        compiled = jax.jit(fn).lower(variables, z, x, *prior_args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = 32, 64
    return max(1, -(-(temp_bytes(large) - temp_bytes(small)) // (large - small)))


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
    ``config.eval`` (the decoder's bytes per sample are measured once, here: two small
    compiles, which JAX's compilation cache keeps)."""
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
    """``eval_step(variables, images [B,H,W,C], mask [B], key, offset) -> sums`` (replicated).

    ``sums`` holds the masked sums over the global batch of ``-ELBO``, ``E_q log p(x|z)``,
    ``KL`` and ``-log p_IWAE(x)`` (K = ``config.eval.iwae_samples``), and ``count``, under the
    model's prior (for the VampPrior the KL is a one-sample Monte-Carlo estimate). Row ``i``
    is example ``offset + i`` of the split and draws its noise from ``fold_in(key, offset +
    i)`` (module docstring). The IWAE decoder calls are sized by :func:`iwae_plan` from
    ``config.eval.memory_mb``.
    """
    log_likelihood_fn = models.make_log_likelihood_fn(
        config.model.likelihood, config.model.obs_logvar
    )
    num_samples = config.eval.iwae_samples
    plan = make_iwae_planner(model, config)

    def per_device(variables, images, mask, keys):
        chunk, rows = plan(images.shape[0])
        pairs = jax.vmap(jax.random.split)(keys)  # [b, 2]: ELBO and IWAE keys per example
        mean, logvar = model.apply(variables, images, train=False, method="encode")
        prior = model.apply(variables, method="prior_log_density_fn")

        def decode_fn(z):
            return model.apply(variables, z, train=False, method="decode")

        def elbo_terms(keys, x, m, lv):
            return losses.elbo(
                keys, decode_fn, x, m, lv, log_likelihood_fn, prior_log_density=prior
            )

        elbo_args = (pairs[:, 0], images, mean, logvar)
        if rows is None:
            elbo, reconstruction, kl = elbo_terms(*elbo_args)
        else:  # one sample of every local example does not fit: `rows` examples per call
            elbo, reconstruction, kl = lax.map(lambda a: elbo_terms(*a), elbo_args, batch_size=rows)
        log_px = losses.iwae_log_likelihood(
            pairs[:, 1],
            decode_fn,
            images,
            mean,
            logvar,
            log_likelihood_fn,
            num_samples=num_samples,
            chunk_size=chunk,
            batch_chunk_size=rows,
            prior_log_density=prior,
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
        in_specs=(PartitionSpec(), *(PartitionSpec(DATA_AXIS),) * 3),
        out_specs=PartitionSpec(),
    )

    @jax.jit
    def eval_step(variables, images, mask, key, offset):
        keys = losses.example_keys(key, images.shape[0], offset=offset)
        return sharded(variables, images, mask, keys)

    return eval_step


def abstract_variables(model: models.VAE) -> Any:
    """``ShapeDtypeStruct`` tree of ``model``'s variables (nothing is computed)."""
    dummy = jnp.zeros((1, *model.image_shape), jnp.float32)
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), dummy, jax.random.PRNGKey(0), train=False)
    )


class EvaluationStopped(Exception):
    """:func:`evaluate` was asked to stop (a signal during training); it has no result."""


def evaluate(
    eval_step: Callable,
    variables: Any,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    key: jax.Array,
    num_dims: int,
    progress: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Means over every real example of ``batches`` (this process's rows of each global batch).

    Returns ``neg_elbo``, ``reconstruction``, ``kl``, ``nll_iwae`` (nats per example),
    ``bits_per_dim`` (of the IWAE NLL, the tightest bound), ``bits_per_dim_elbo`` and
    ``num_examples``. Example ``j`` of the split draws its noise from ``fold_in(key, j)``, so
    an evaluation is deterministic given the key, whatever the batch size and device count.

    ``progress(examples_done, seconds)``, when given, is called after each batch with the
    number of real examples evaluated so far (by all processes); it waits for that batch's
    result, which costs nothing next to a batch of an IWAE evaluation.

    ``should_stop()``, when given, is asked before every batch but the first (in every
    process: the same number of calls); when it says so the evaluation is abandoned with
    :class:`EvaluationStopped`.
    """
    partial = []
    done = 0.0
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        if i and should_stop is not None and should_stop():
            raise EvaluationStopped(f"stopped after {i} of the evaluation's batches")
        images = shard_batch(np.asarray(batch["image"], np.float32), mesh)
        mask = shard_batch(np.asarray(batch["mask"], bool), mesh)
        offset = np.int32(i * images.shape[0])  # index of the batch's first example
        partial.append(eval_step(variables, images, mask, key, offset))
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
    ``linspace(0, 1, steps)``. One function, so evaluation compiles one picture program. With
    no images (``N = 0``) it returns ``{"samples"}`` alone.
    """

    @jax.jit
    def pictures(variables, x, key):
        samples = model.apply(variables, key, num_samples, method="sample")
        if x.shape[0] == 0:  # no images (sampling without the dataset): samples only
            return {"samples": samples}
        reconstructions = model.apply(variables, x, method="reconstruct")
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
    "EvaluationStopped",
    "abstract_variables",
    "decoder_bytes_per_sample",
    "evaluate",
    "iwae_plan",
    "make_eval_step",
    "make_iwae_planner",
    "make_picture_fn",
]
