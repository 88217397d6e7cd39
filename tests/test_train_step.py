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
from jaxvae.train_step import _forward, _forward_iwae, make_train_step

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
    ll = models.make_log_likelihood_fn(config.model.likelihood, config.model.obs_logvar)
    if config.objective == "iwae":
        return _reference_iwae_step(model, tx, config, state, images, key, ll)
    eps = jax.random.normal(key, (BATCH, model.latent_dim), jnp.float32)

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


def _reference_iwae_step(model, tx, config, state, images, key, ll):
    """The IWAE step written from ``losses.iwae_bound``'s definition on one device."""
    k = config.iwae_samples
    eps = jax.random.normal(key, (k, BATCH, model.latent_dim), jnp.float32)

    def loss_fn(params):
        (log_w, _, _), upd = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            eps,
            ll,
            method=_forward_iwae,
            mutable=["batch_stats"],
        )
        bound = jax.nn.logsumexp(log_w, axis=0) - np.log(k)
        return -jnp.mean(bound), upd["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return loss, optax.apply_updates(state.params, updates), batch_stats


@pytest.mark.parametrize("objective", ["elbo", "iwae", "vanilla_vae_loss"])
def test_eight_device_step_equals_single_device_step(objective):
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    config.objective = objective
    config.iwae_samples = 3
    # SGD: the parameter change is lr * gradient, so this compares gradients (Adam's first step
    # is ~lr * sign(g) and would amplify rounding noise on near-zero gradients).
    lr = 1.0 if objective == "vanilla_vae_loss" else 1e-2
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


def _one_step(config, images, seed=3):
    """(metrics, new state) of one 8-device step from the seed's initial state (SGD 1e-2)."""
    tx = optax.sgd(1e-2)
    mesh = make_mesh()
    model = ts.build_model(config, SHAPE, "data")
    state0 = jax.jit(lambda: ts.init_train_state(ts.build_model(config, SHAPE, None), tx, seed))()
    step = make_train_step(model, tx, config, mesh, BATCH)
    new, metrics = step(replicate(state0, mesh), shard_batch(images, mesh))
    return jax.device_get(metrics), jax.device_get(new)


def test_iwae_objective_with_one_sample_is_the_elbo_step():
    """K = 1 draws the ELBO step's noise and decodes the same z: reconstruction, analytic KL,
    neg_elbo and the BatchNorm statistics are the ELBO step's; the loss is the one-sample
    ELBO whose KL is estimated by Monte Carlo (``log q(z|x) - log p(z)`` at that z), i.e. the
    ELBO step's loss plus ``mean(KL_mc - KL)``, computed here from the encoder's outputs."""
    images = (np.random.default_rng(1).random((BATCH, *SHAPE)) < 0.3).astype(np.float32)
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    m_elbo, s_elbo = _one_step(config, images)
    config.objective, config.iwae_samples = "iwae", 1
    m_iwae, s_iwae = _one_step(config, images)
    for k in ("neg_elbo", "reconstruction", "kl"):
        np.testing.assert_allclose(m_iwae[k], m_elbo[k], rtol=2e-6, err_msg=k)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
        s_iwae.batch_stats,
        s_elbo.batch_stats,
    )
    # The Monte-Carlo KL at the step's sample, from the encoder in training mode (global-batch
    # BatchNorm statistics, as in the step) and the step's noise.
    model = ts.build_model(config, SHAPE, None)
    state0 = ts.init_train_state(model, optax.sgd(1e-2), seed=3)
    (mean, logvar), _ = model.apply(
        state0.variables, jnp.asarray(images), train=True, method="encode", mutable=["batch_stats"]
    )
    eps = jax.random.normal(jax.random.fold_in(state0.key, 0), (BATCH, model.latent_dim))
    z = mean + jnp.exp(0.5 * logvar) * eps
    kl_mc = losses.gaussian_log_density(z, mean, logvar) - losses.gaussian_log_density(z)
    kl = losses.gaussian_kl(mean, logvar)
    assert float(jnp.mean(jnp.abs(kl_mc - kl))) > 1e-3  # the two estimators differ here
    np.testing.assert_allclose(
        m_iwae["loss"], m_elbo["loss"] + float(jnp.mean(kl_mc - kl)), rtol=1e-6, atol=2e-4
    )


def test_iwae_objective_tightens_with_k():
    """At fixed states, the step's loss (-IWAE_K) falls as K grows: 1 -> 8 -> 64, paired over
    6 initial states, each state's noise fresh per K (the bound rises toward log p(x); its
    approach to the exact log p(x) of a linear-Gaussian model is tested on the same pure
    functions in tests/test_losses.py). The analytic KL, which no noise touches, repeats."""
    images = (np.random.default_rng(2).random((BATCH, *SHAPE)) < 0.3).astype(np.float32)
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    config.objective = "iwae"
    tx, mesh = optax.sgd(1e-2), make_mesh()
    init = jax.jit(lambda seed: ts.init_train_state(ts.build_model(config, SHAPE, None), tx, seed))
    batch = shard_batch(images, mesh)
    per_k, kls = [], []
    for k in (1, 8, 64):
        config.iwae_samples = k
        step = make_train_step(ts.build_model(config, SHAPE, "data"), tx, config, mesh, BATCH)
        runs = [jax.device_get(step(replicate(init(100 + s), mesh), batch)[1]) for s in range(6)]
        per_k.append(np.array([m["loss"] for m in runs]))
        kls.append(np.array([m["kl"] for m in runs]))
    for a, b in ((0, 1), (1, 2)):
        d = per_k[a] - per_k[b]
        print(f"loss(K index {a}) - loss(K index {b}) per state: {d}")
        assert np.all(d > 0), d  # each of 6 paired draws (1/64 by chance if K did nothing)
    np.testing.assert_allclose(kls[0], kls[2], rtol=1e-6)


def test_batch_not_divisible_by_devices_is_rejected():
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    model = ts.build_model(config, SHAPE, "data")
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        make_train_step(model, optax.sgd(1.0), config, make_mesh(), 12)
