"""The data-parallel step on 8 devices equals a plain single-device step on the global batch."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxvae import config_utils, losses, models
from jaxvae import train_state as ts
from jaxvae.mesh import make_mesh, replicate, shard_batch
from jaxvae.train_step import _forward, make_train_step

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
SHAPE = (28, 28, 1)


def test_grad_of_replicated_param_under_shard_map_is_already_summed():
    """The pitfall behind the loss scaling: no pmean of gradients is needed (or correct)."""
    mesh = make_mesh()
    x = jnp.arange(8.0)

    def local_grad(w, xs):
        return jax.grad(lambda w: jnp.sum(w * xs))(w)

    fn = jax.shard_map(local_grad, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    g = jax.jit(fn)(jnp.float32(1.0), x)
    assert float(g) == float(jnp.sum(x))  # sum over devices, not the per-device value or mean


def _reference_step(model, tx, config, state, images):
    """One step on one device, no mapped axis: mean loss over the global batch."""
    key = jax.random.fold_in(state.key, state.step)
    eps = jax.random.normal(key, (BATCH, model.latent_dim), jnp.float32)
    ll = models.make_log_likelihood_fn(config.model.likelihood, config.model.obs_logvar)

    def loss_fn(params):
        (outputs, mean, logvar), upd = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            eps,
            method=_forward,
            mutable=["batch_stats"],
        )
        if config.objective == "elbo":
            loss = jnp.mean(losses.gaussian_kl(mean, logvar) - ll(images, outputs))
        else:
            loss, _ = losses.vanilla_vae_loss(
                models.mean_image(config.model.likelihood, outputs),
                images,
                mean,
                logvar,
                kld_weight=config.kld_weight,
            )
        return loss, upd["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return loss, optax.apply_updates(state.params, updates), batch_stats


@pytest.mark.parametrize("objective", ["elbo", "vanilla_vae_loss"])
def test_eight_device_step_equals_single_device_step(objective):
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    config.objective = objective
    # SGD: the parameter change is lr * gradient, so this compares gradients (Adam's first step
    # is ~lr * sign(g) and would amplify rounding noise on near-zero gradients).
    lr = 1e-2 if objective == "elbo" else 1.0
    tx = optax.sgd(lr)
    mesh = make_mesh()
    assert mesh.size == 8
    images = (np.random.default_rng(0).random((BATCH, *SHAPE)) < 0.3).astype(np.float32)

    model1 = ts.build_model(config, SHAPE, None)
    state0 = jax.jit(lambda: ts.init_train_state(model1, tx, seed=3))()
    ref_loss, ref_params, ref_stats = jax.jit(
        lambda s, x: _reference_step(model1, tx, config, s, x)
    )(state0, jnp.asarray(images))

    model8 = ts.build_model(config, SHAPE, "data")
    step = make_train_step(model8, tx, config, mesh, BATCH)
    params0 = jax.device_get(state0.params)
    # The same initial state (init is axis-free); the step donates (deletes) its input.
    state8 = replicate(state0, mesh)
    new8, metrics = step(state8, shard_batch(images, mesh))

    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    assert int(new8.step) == 1
    # Parameters moved (so the comparison has teeth) and by the same amount on both paths.
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ref_params, params0)
    assert max(jax.tree.leaves(moved)) > 1e-3
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5),
        jax.device_get(new8.params),
        jax.device_get(ref_params),
    )
    # BatchNorm running statistics come from the GLOBAL batch on both paths.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5),
        jax.device_get(new8.batch_stats),
        jax.device_get(ref_stats),
    )


def test_batch_not_divisible_by_devices_is_rejected():
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    model = ts.build_model(config, SHAPE, "data")
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        make_train_step(model, optax.sgd(1.0), config, make_mesh(), 12)
