"""The data-parallel training step: ``jit`` + ``jax.shard_map`` over a 1-D ``data`` mesh.

Layout: the global batch is split along its first axis over the mesh axis ``"data"``; the
:class:`~jaxvae.train_state.TrainState` (params, BatchNorm statistics, optimizer state, key) is
replicated. BatchNorm reduces its batch statistics over ``"data"`` (the model is built with
``axis_name="data"``), so it sees the global batch.

Gradient scaling. Inside ``shard_map`` (``check_vma=True``) a replicated parameter is
*device-invariant* while the loss computed from the local shard is *device-varying*; JAX
differentiates the implicit invariant->varying broadcast, whose transpose is a ``psum``. So
``jax.grad`` of the local loss already returns the SUM over devices of the per-device gradients.
We therefore define the local loss as ``sum over local examples / global batch size``: the sum
over devices of these is exactly the global-batch mean, and so is its gradient. An extra
``lax.pmean(grads)`` would divide by the device count a second time (tested in
``tests/test_train_step.py`` against a single-device step).

Noise. The reparameterisation noise of step ``t`` is ``eps = normal(fold_in(key, t), [B, D])``
for the whole global batch ``B``; each device takes its rows. A run is therefore reproducible from
``config.seed`` and draws the same noise whatever the number of devices (which is what lets the
8-device step be compared with the 1-device step exactly). Generating ``B x D`` normals per
device costs nothing next to the convolutions.

Mixed precision (``config.model.dtype = "bfloat16"``). The model computes in bfloat16 but
returns float32 means, log-variances and decoder outputs (``jaxvae.models``), so the noise, the
KL, the log-likelihoods, the IWAE ``logsumexp``, every sum below and the loss are float32; so
are the parameters, their gradients (summed over devices in float32, see :func:`_varying`),
the optimizer state and the BatchNorm statistics. Tested in ``tests/test_train_step.py``: no
reduction or cross-device sum of the traced step takes a bfloat16 operand, every matmul and
convolution takes bfloat16 ones, and loss and gradients agree with the float32 step's within
bfloat16's rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jaxvae import losses, models
from jaxvae.mesh import DATA_AXIS
from jaxvae.train_state import TrainState


def kl_beta(step: jax.Array, beta: float, warmup_steps: int) -> jax.Array:
    """KL weight at ``step`` (0-based): ``beta * min(1, (step + 1) / warmup_steps)``."""
    if warmup_steps <= 0:
        return jnp.asarray(beta, jnp.float32)
    ramp = (step.astype(jnp.float32) + 1.0) / warmup_steps
    return beta * jnp.minimum(1.0, ramp)


def _forward(module: models.VAE, x: jax.Array, eps: jax.Array):
    """Flax method: encode, reparameterise with the given noise, decode (training mode).

    ``x: [b, H, W, C]``, ``eps: [b, D]`` -> ``(outputs [b, H, W, C], mean [b, D], logvar [b, D])``.
    """
    mean, logvar = module.encode(x, train=True)
    z = mean + jnp.exp(0.5 * logvar) * eps
    return module.decode(z, train=True), mean, logvar


def _forward_iwae(module: models.VAE, x: jax.Array, eps: jax.Array, log_likelihood_fn):
    """Flax method: ``log_w [K, b]`` of :func:`jaxvae.losses.log_importance_weights` for the
    noise ``eps: [K, b, D]``, plus ``mean``, ``logvar [b, D]`` (training mode; the decoder's
    BatchNorm sees all ``K * b`` decoded samples)."""
    mean, logvar = module.encode(x, train=True)

    def decode_fn(z):
        return module.decode(z, train=True)

    log_w = losses.log_importance_weights(decode_fn, x, mean, logvar, eps, log_likelihood_fn)
    return log_w, mean, logvar


def _varying(params):
    """The replicated float32 parameters, marked device-varying before the model casts them.

    The transpose of this cast is the ``psum`` that sums the gradient over devices (module
    docstring), so the sum runs on float32 gradients. Left to JAX, the invariant -> varying
    cast would be inserted where a parameter first meets the local batch: in a bfloat16 model
    that is after its cast to bfloat16, and the gradient would be summed over devices in
    bfloat16. (For float32 it moves the same sums, over the same values.)

    ``lax.pcast(..., to="varying")`` is jax >= 0.8's name for what jax 0.7 (the lower bound,
    and Colab's 0.7.2) calls ``lax.pvary``.
    """
    if hasattr(lax, "pcast"):
        return lax.pcast(params, DATA_AXIS, to="varying")
    return lax.pvary(params, DATA_AXIS)


def _global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together (``optax.tree.norm``, which optax 0.2.4, the lower
    bound, does not have)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def _elbo_sums(reconstruction: jax.Array, kl: jax.Array) -> dict[str, jax.Array]:
    """Local sums of the reported terms (beta = 1) from per-example ``[b]`` values."""
    return {
        "neg_elbo": jnp.sum(kl - reconstruction),
        "reconstruction": jnp.sum(reconstruction),
        "kl": jnp.sum(kl),
    }


def make_train_step(
    model: models.VAE,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    global_batch_size: int,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, images [B, H, W, C]) -> (new_state, metrics)``, jitted, state donated.

    ``images`` is the global batch sharded over ``"data"`` (``B = global_batch_size``). Metrics
    are replicated scalars (global-batch means): ``loss`` (the optimised objective),
    ``neg_elbo`` (beta = 1), ``reconstruction`` (E_q log p(x|z)), ``kl``, ``beta``,
    ``grad_norm``, ``param_norm`` (after the update); plus ``mse`` for the
    ``vanilla_vae_loss`` objective.

    ``objective="iwae"`` optimises the importance-weighted bound with ``K =
    config.iwae_samples`` (Burda et al. 2015): ``loss`` is ``-IWAE_K``, the noise is
    ``normal(fold_in(key, t), [K, B, D])`` sliced per device along ``B`` (so, as for the ELBO,
    any device count draws the same numbers, and ``K = 1`` draws exactly the ELBO's noise);
    ``reconstruction`` is averaged over the ``K`` samples and ``kl`` is the analytic KL.
    """
    if model.axis_name != DATA_AXIS:
        raise ValueError(
            f"the training model needs axis_name={DATA_AXIS!r}, got {model.axis_name!r}"
        )
    num_devices = mesh.shape[DATA_AXIS]
    if global_batch_size % num_devices:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {num_devices} devices"
        )
    log_likelihood_fn = models.make_log_likelihood_fn(
        config.model.likelihood, config.model.obs_logvar
    )
    objective = config.objective
    latent_dim = model.latent_dim
    num_samples = config.iwae_samples if objective == "iwae" else 1

    def per_device(state: TrainState, images: jax.Array):
        local_batch = images.shape[0]
        key = jax.random.fold_in(state.key, state.step)
        start = lax.axis_index(DATA_AXIS) * local_batch
        # [B, D], or [K, B, D] for the IWAE: the global batch's noise, this device's rows.
        shape = (global_batch_size, latent_dim)
        if objective == "iwae":
            shape = (num_samples, *shape)
        eps_all = jax.random.normal(key, shape, jnp.float32)
        eps = lax.dynamic_slice_in_dim(eps_all, start, local_batch, axis=len(shape) - 2)
        beta = kl_beta(state.step, config.beta, config.kl_warmup_steps)

        def iwae_loss_fn(params):
            variables = {"params": _varying(params), "batch_stats": state.batch_stats}
            (log_w, mean, logvar), updates = model.apply(
                variables,
                images,
                eps,
                log_likelihood_fn,
                method=_forward_iwae,
                mutable=["batch_stats"],
            )
            bound = jax.nn.logsumexp(log_w, axis=0) - jnp.log(float(num_samples))  # [b]
            # log p(x|z_k) = log w_k - (log p(z_k) - log q(z_k|x)); the ratio is cheap in D.
            z = mean + jnp.exp(0.5 * logvar) * eps
            log_ratio = losses.gaussian_log_density(z) - losses.gaussian_log_density(
                z, mean, logvar
            )
            reconstruction = jnp.mean(log_w - log_ratio, axis=0)  # [b]
            sums = _elbo_sums(reconstruction, losses.gaussian_kl(mean, logvar))
            # As for the ELBO: local sum / GLOBAL batch (see the module docstring).
            local_loss = -jnp.sum(bound) / global_batch_size
            return local_loss, (updates["batch_stats"], sums)

        def loss_fn(params):
            variables = {"params": _varying(params), "batch_stats": state.batch_stats}
            (outputs, mean, logvar), updates = model.apply(
                variables, images, eps, method=_forward, mutable=["batch_stats"]
            )
            reconstruction = log_likelihood_fn(images, outputs)  # [b]
            kl = losses.gaussian_kl(mean, logvar)  # [b]
            sums = _elbo_sums(reconstruction, kl)
            if objective == "elbo":
                # Sum over local examples / GLOBAL batch: the implicit psum of the gradient
                # then yields the gradient of the global-batch mean.
                local_loss = jnp.sum(beta * kl - reconstruction) / global_batch_size
            else:
                recon_image = models.mean_image(config.model.likelihood, outputs)
                loss, m = losses.vanilla_vae_loss(
                    recon_image, images, mean, logvar, kld_weight=config.kld_weight
                )
                # A mean over the equal-sized local batch: /num_devices makes the sum over
                # devices the global-batch mean.
                local_loss = loss / num_devices
                sums["mse"] = m["reconstruction_loss"] * local_batch
            return local_loss, (updates["batch_stats"], sums)

        fn = iwae_loss_fn if objective == "iwae" else loss_fn
        (local_loss, (batch_stats, sums)), grads = jax.value_and_grad(fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: lax.psum(v, DATA_AXIS) / global_batch_size for k, v in sums.items()}
        metrics["loss"] = lax.psum(local_loss, DATA_AXIS)
        metrics["beta"] = beta
        metrics["grad_norm"] = _global_norm(grads)
        # Of the updated parameters: an update that overflows shows here before it reaches a
        # checkpoint (the training loop stops on any non-finite metric).
        metrics["param_norm"] = _global_norm(params)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        return new_state, metrics

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
        out_specs=(PartitionSpec(), PartitionSpec()),
    )
    return jax.jit(sharded, donate_argnums=(0,))


__all__ = ["kl_beta", "make_train_step"]
