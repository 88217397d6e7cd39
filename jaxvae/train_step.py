"""The data-parallel training step: ``jax.jit`` over arrays sharded along the ``"data"`` mesh.

The step is written for the *global* batch, as on one device: ``images [B, H, W, C]`` arrive
sharded along their first axis over every device of every process (``NamedSharding(mesh,
P("data"))``); the :class:`~jaxvae.train_state.TrainState` is replicated. XLA's SPMD
partitioner splits the computation by the batch sharding and inserts the cross-device sums
itself, so the BatchNorm statistics, the loss (a mean over ``B``) and its gradient are those
of the global batch by construction: there is no per-device code, no ``axis_name`` and no
gradient ``pmean`` to get right. This is what ``jax.pmap`` (which the project's mission
names) did with an explicit per-device function and ``lax.pmean``; JAX's sharding guide
recommends ``jit`` over sharded arrays instead, and it scales the same way from one CPU to a
TPU pod slice.

The objective is computed by :mod:`jaxvae.losses` (``elbo``, ``iwae_bound``, or
``reparameterize`` + ``vanilla_vae_loss``) with the model's encoder and its decoder passed as
``decode_fn``: the functions researchers import are the ones that train. They also get
``config.gradient_estimator`` (``"stl"`` for the ELBO, ``"dreg"`` for the IWAE bound) as
``gradient_estimator=`` and the model's prior (the VampPrior for ``config.model.prior =
"vamp"``) as ``prior_log_density=``.

Noise. Example ``i`` of step ``t``'s global batch has the key ``fold_in(fold_in(state.key, t),
i)`` (``losses.example_keys``), and :mod:`jaxvae.losses` draws its noise from that key alone.
The numbers are therefore the same for any number of devices or processes (evaluation uses the
same rule, :mod:`jaxvae.evaluate`), and a resumed run draws exactly what an uninterrupted one
would.

Mixed precision (``config.model.dtype = "bfloat16"``). The model computes in bfloat16 but
returns float32 means, log-variances and decoder outputs (``jaxvae.models``), so the noise,
the KL, the log-likelihoods, the IWAE bound's log-mean-exp, every mean below and the loss are
float32; so are the parameters, their gradients, the optimizer state and the BatchNorm
statistics. Tested in ``tests/test_train_step.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxvae import config_utils, losses, models
from jaxvae.mesh import DATA_AXIS
from jaxvae.train_state import TrainState


def kl_beta(step: jax.Array, beta: float, warmup_steps: int) -> jax.Array:
    """KL weight at ``step`` (0-based): ``beta * min(1, (step + 1) / warmup_steps)``."""
    if warmup_steps <= 0:
        return jnp.asarray(beta, jnp.float32)
    ramp = (step.astype(jnp.float32) + 1.0) / warmup_steps
    return beta * jnp.minimum(1.0, ramp)


# The objectives are Flax methods (``model.apply(..., method=fn)``): the encoder and the
# decoder run in training mode with their BatchNorm statistics updated in place. Each returns
# ``(loss, terms)`` where ``terms`` holds per-example ``[B]`` values for the metrics. The prior
# (``module.prior_log_density_fn()``: None for N(0, I), else the VampPrior) is built before the
# batch is encoded, from the running statistics the step starts with (models.VAE).


def _recorded(fn: Callable, calls: list) -> Callable:
    """``fn``, appending ``(args, fn(*args))`` to ``calls`` at each call.

    For the metrics: the objectives read the values a loss computed instead of computing them a
    second time. The wrapped functions run in the primal computation (``jaxvae.losses`` calls
    them outside its ``custom_vjp``), so what is recorded belongs to the step's own trace.
    """

    def wrapped(*args):
        calls.append((args, fn(*args)))
        return calls[-1][1]

    return wrapped


def _elbo(module: models.VAE, x, keys, beta, *, log_likelihood_fn, gradient_estimator):
    """``-mean(ELBO_beta)``, with ``losses.elbo`` (one sample; analytic KL for ``N(0, I)`` and
    ``"standard"``, else Monte Carlo). The reported KL is the analytic one whenever the prior is
    ``N(0, I)``, whatever the estimator."""
    prior = module.prior_log_density_fn()
    mean, logvar = module.encode(x, train=True)
    decode = functools.partial(module.decode, train=True)
    value, reconstruction, kl = losses.elbo(
        keys,
        decode,
        x,
        mean,
        logvar,
        log_likelihood_fn,
        beta=beta,
        gradient_estimator=gradient_estimator,
        prior_log_density=prior,
    )
    if prior is None:
        kl = losses.gaussian_kl(mean, logvar)
    return -jnp.mean(value), {"reconstruction": reconstruction, "kl": kl}


def _iwae(module: models.VAE, x, keys, beta, *, log_likelihood_fn, num_samples, gradient_estimator):
    """``-mean(IWAE_K)``, with ``losses.iwae_bound``; ``beta`` is not used by this bound."""
    del beta
    prior = module.prior_log_density_fn()
    mean, logvar = module.encode(x, train=True)
    decode = functools.partial(module.decode, train=True)
    # The reported reconstruction term is the mean of log p(x|z_k) over the K samples, and,
    # for a prior other than N(0, I), the KL is the mean of log q(z_k|x) - log p(z_k): the
    # values the bound computes are recorded instead of decoding the samples a second time.
    likelihoods, priors = [], []
    bound = losses.iwae_bound(
        keys,
        decode,
        x,
        mean,
        logvar,
        _recorded(log_likelihood_fn, likelihoods),
        num_samples=num_samples,
        gradient_estimator=gradient_estimator,
        prior_log_density=None if prior is None else _recorded(prior, priors),
    )
    if prior is None:
        kl = losses.gaussian_kl(mean, logvar)
    else:
        (z,), log_pz = priors[0]
        kl = jnp.mean(losses.gaussian_log_density(z, mean, logvar) - log_pz, axis=0)
    terms = {"reconstruction": jnp.mean(likelihoods[0][1], axis=0), "kl": kl}
    return -jnp.mean(bound), terms


def _vanilla(module: models.VAE, x, keys, beta, *, log_likelihood_fn, likelihood, kld_weight):
    """PyTorch-VAE's loss (``losses.vanilla_vae_loss``); ``beta`` is not used by it."""
    del beta
    mean, logvar = module.encode(x, train=True)
    outputs = module.decode(losses.reparameterize(keys, mean, logvar), train=True)
    loss, m = losses.vanilla_vae_loss(
        models.mean_image(likelihood, outputs), x, mean, logvar, kld_weight=kld_weight
    )
    terms = {
        "reconstruction": log_likelihood_fn(x, outputs),
        "kl": losses.gaussian_kl(mean, logvar),
        "mse": jnp.broadcast_to(m["reconstruction_loss"], mean.shape[:1]),
    }
    return loss, terms


def make_objective(config: ml_collections.ConfigDict) -> Callable:
    """The Flax method ``fn(module, x [B,H,W,C], keys [B], beta) -> (loss, terms)`` of
    ``config.objective`` with ``config.gradient_estimator``."""
    log_likelihood_fn = models.make_log_likelihood_fn(
        config.model.likelihood, config.model.obs_logvar
    )
    estimator = config.gradient_estimator
    if config.objective == "elbo":
        return functools.partial(
            _elbo, log_likelihood_fn=log_likelihood_fn, gradient_estimator=estimator
        )
    if config.objective == "iwae":
        return functools.partial(
            _iwae,
            log_likelihood_fn=log_likelihood_fn,
            num_samples=config.iwae_samples,
            gradient_estimator=estimator,
        )
    if config.objective == "vanilla_vae_loss":
        return functools.partial(
            _vanilla,
            log_likelihood_fn=log_likelihood_fn,
            likelihood=config.model.likelihood,
            kld_weight=config.kld_weight,
        )
    raise ValueError(
        f"config.objective must be one of {config_utils.OBJECTIVES}, got {config.objective!r}"
    )


def _global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together (``optax.tree.norm``, which optax 0.2.4, the lower
    bound, does not have)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def make_train_step(
    model: models.VAE,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, images [B, H, W, C]) -> (new_state, metrics)``, jitted, state donated.

    ``images`` is the global batch sharded over ``"data"`` (``B`` a multiple of the number of
    devices). Metrics are replicated scalars (global-batch means): ``loss`` (the optimised
    objective), ``neg_elbo`` (beta = 1), ``reconstruction`` (``log p(x|z)``; the mean over the
    ``K`` samples for ``objective="iwae"``), ``kl`` (analytic for ``N(0, I)``, a Monte-Carlo
    estimate on the same samples for the VampPrior), ``beta``, ``grad_norm``,
    ``param_norm`` (after the update); plus ``mse`` for the ``vanilla_vae_loss`` objective.
    """
    objective = make_objective(config)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

    def step(state: TrainState, images: jax.Array):
        keys = losses.example_keys(jax.random.fold_in(state.key, state.step), images.shape[0])
        beta = kl_beta(state.step, config.beta, config.kl_warmup_steps)

        def loss_fn(params):
            (loss, terms), updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                keys,
                beta,
                method=objective,
                mutable=["batch_stats"],
            )
            return loss, (updates["batch_stats"], terms)

        (loss, (batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: jnp.mean(v) for k, v in terms.items()}
        metrics["neg_elbo"] = metrics["kl"] - metrics["reconstruction"]
        metrics["loss"] = loss
        metrics["beta"] = beta
        metrics["grad_norm"] = _global_norm(grads)
        # Of the updated parameters: an update that overflows shows here before it reaches a
        # checkpoint (the training loop stops on any non-finite metric).
        metrics["param_norm"] = _global_norm(params)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(replicated, batch),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


__all__ = ["kl_beta", "make_objective", "make_train_step"]
