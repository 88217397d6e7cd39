"""The data-parallel step on 8 devices equals the step on 1 device and a plain reference."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxpr_walk import BF16, F32, dtypes, equations, is_float32_sum, is_product, is_reduction

from jaxvae import config_utils, evaluate, losses, models
from jaxvae import train_state as ts
from jaxvae.mesh import make_mesh, replicate, shard_batch
from jaxvae.train_step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
SHAPE = (28, 28, 1)


def _step_noise(state, num_samples: int, latent_dim: int) -> jax.Array:
    """``[K, B, D]``, the documented noise of the step: example ``i``'s ``[K, D]`` is
    ``normal(fold_in(fold_in(key, t), i), (K, D))``, drawn here one example at a time (a loop:
    unrolled in Python, its 16 copies of the generator took ~1 s more to compile per test)."""
    step_key = jax.random.fold_in(state.key, state.step)
    per_example = jax.lax.map(
        lambda i: jax.random.normal(jax.random.fold_in(step_key, i), (num_samples, latent_dim)),
        jnp.arange(BATCH),
    )
    return jnp.moveaxis(per_example, 0, 1)


def _vamp_log_density(model, variables, z):
    """The VampPrior from its definition: ``log (1/M) sum_m N(z; mu_m, e^lv_m)`` for ``z [..., D]``,
    ``(mu_m, lv_m)`` the encoder's outputs at pseudo-input ``m`` with BatchNorm's running
    statistics (the ones in ``variables``: those the step starts from)."""
    u = variables["params"]["pseudo_inputs"]
    mu, lv = model.apply(variables, u, train=False, method="encode")
    per_component = [losses.gaussian_log_density(z, mu[m], lv[m]) for m in range(len(u))]
    return jax.nn.logsumexp(jnp.stack(per_component, axis=-1), axis=-1) - np.log(len(u))


def _reference_loss(model, config, variables, images, eps):
    """(loss, new batch_stats): each objective written from its definition, on one device.

    The prior is N(0, I) or the VampPrior; STL and DReG differentiate ``log q(z|x)`` along ``z``
    only (``q``'s parameters held fixed in its density). For DReG the loss has the value of the
    IWAE bound and the gradient of Tucker et al.'s surrogate: the encoder's from ``sum_k
    w~_k^2 log w_k`` with ``z`` live and the decoder and the prior held fixed, theirs from
    ``logsumexp_k log w_k`` at fixed ``z`` (exact for a decoder without BatchNorm, whose
    samples do not interact: the DReG tests use the MLP decoder)."""
    sg = jax.lax.stop_gradient
    ll = models.make_log_likelihood_fn(config.model.likelihood, config.model.obs_logvar)
    (mean, logvar), enc = model.apply(
        variables, images, train=True, method="encode", mutable=["batch_stats"]
    )
    z = mean + jnp.exp(0.5 * logvar) * eps
    q = (mean, logvar) if config.gradient_estimator == "standard" else (sg(mean), sg(logvar))

    def log_weights(v, z):
        """``log p(x|z) + log p(z) - log q(z|x)`` ``[K, B]``, decoder outputs and statistics."""
        outputs, dec = model.apply(v, z, train=True, method="decode", mutable=["batch_stats"])
        if config.model.prior == "vamp":
            log_pz = _vamp_log_density(model, v, z)
        else:
            log_pz = losses.gaussian_log_density(z)
        log_w = ll(images, outputs) + log_pz - losses.gaussian_log_density(z, *q)
        return log_w, outputs, dec["batch_stats"]

    log_w, outputs, decoder_stats = log_weights(variables, z)
    stats = {**decoder_stats, "encoder": enc["batch_stats"]["encoder"]}
    if config.objective == "elbo":
        if config.model.prior == "vamp" or config.gradient_estimator == "stl":
            loss = -jnp.mean(log_w[0])  # the KL by Monte Carlo
        else:
            loss = jnp.mean(losses.gaussian_kl(mean, logvar) - ll(images, outputs[0]))
    elif config.objective == "iwae":
        loss = -jnp.mean(jax.nn.logsumexp(log_w, axis=0) - np.log(eps.shape[0]))
        if config.gradient_estimator == "dreg":
            encoder_part = log_weights(sg(variables), z)[0]
            model_part = log_weights(variables, sg(z))[0]
            w = jax.nn.softmax(sg(model_part), axis=0)
            surrogate = -jnp.mean(
                jnp.sum(w**2 * encoder_part, axis=0) + jax.nn.logsumexp(model_part, axis=0)
            )
            loss = sg(loss) + surrogate - sg(surrogate)
    else:
        recon = models.mean_image(config.model.likelihood, outputs[0])
        sq = jnp.mean(jnp.square(recon - images))
        kl = jnp.mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=-1))
        loss = sq + config.kld_weight * kl
    return loss, stats


def _reference_step(model, tx, config, state, images):
    """One step on one device without a mesh: the reference the sharded steps must equal."""
    k = config.iwae_samples if config.objective == "iwae" else 1
    eps = _step_noise(state, k, model.latent_dim)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        return _reference_loss(model, config, variables, images, eps)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    return loss, optax.apply_updates(state.params, updates), batch_stats


# (objective, gradient_estimator, prior); the DReG cases use the MLP decoder (see
# _reference_loss).
OBJECTIVES = [
    ("elbo", "standard", "standard"),
    ("iwae", "standard", "standard"),
    ("vanilla_vae_loss", "standard", "standard"),
]
OPTIONS = [
    ("elbo", "stl", "vamp"),
    ("iwae", "dreg", "standard"),
    ("iwae", "dreg", "vamp"),
]


@pytest.mark.parametrize(
    ("dtype", "objective", "estimator", "prior"),
    [
        *[("float32", *o) for o in OBJECTIVES + OPTIONS],
        *[("bfloat16", *o) for o in OBJECTIVES],
        ("bfloat16", "iwae", "dreg", "vamp"),
    ],
)
def test_eight_device_step_equals_one_device_step_and_reference(objective, estimator, prior, dtype):
    """The step on 8 devices and on 1 device equal a plain one-device step written from the
    objective's definition with the documented noise: loss, updated parameters and BatchNorm
    statistics (global-batch statistics on every path). Also with the STL and DReG gradient
    estimators and the VampPrior (5 pseudo-inputs, a parameter replicated over the devices,
    encoded with the running statistics the step starts from: they leave the batch's
    statistics alone), whose references are written from their definitions too.

    Also in bfloat16, where the reference runs the same bfloat16 model. There the paths round
    to bfloat16 at different places (a weight gradient's contraction split over devices;
    BatchNorm statistics summed in another order, which moves some activations by one
    bfloat16 spacing): measured, their gradients differ by 1-3% per leaf (each is 2-9% from
    the float32 gradient), so the updates are compared with the bounds of the
    bfloat16-vs-float32 test below; the loss and BatchNorm statistics, float32 reductions of a
    forward pass that the rounding barely touches, stay tight. That still fails a gradient
    averaged twice over devices (1/8 of it) or per-device statistics."""
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    config.objective, config.gradient_estimator = objective, estimator
    config.model.prior, config.model.num_pseudo_inputs = prior, 5
    config.iwae_samples = 3
    config.model.dtype = dtype
    if estimator == "dreg":
        config.model.decoder_type, config.model.decoder_hidden_dims = "mlp", (32,)
    config_utils.validate(config, num_devices=8)
    # SGD: the parameter change is lr * gradient, so this compares gradients (Adam's first step
    # is ~lr * sign(g) and would amplify rounding noise on near-zero gradients).
    lr = 1.0 if objective == "vanilla_vae_loss" else 1e-2
    tx = optax.sgd(lr)
    images = (np.random.default_rng(0).random((BATCH, *SHAPE)) < 0.3).astype(np.float32)

    model = ts.build_model(config, SHAPE)
    state0 = jax.jit(lambda: ts.init_train_state(model, tx, seed=3))()
    ref_loss, ref_params, ref_stats = jax.jit(
        lambda s, x: _reference_step(model, tx, config, s, x)
    )(state0, jnp.asarray(images))
    params0 = jax.device_get(state0.params)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ref_params, params0)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the comparison has teeth

    for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh(devices)
        step = make_train_step(model, tx, config, mesh)
        # The same initial state, from the host: the step donates (deletes) its input.
        new, metrics = step(replicate(jax.device_get(state0), mesh), shard_batch(images, mesh))
        assert int(new.step) == 1
        # bfloat16: measured up to 1.2e-5 (vanilla_vae_loss on 8 devices, a loss of 0.24).
        loss_tol = 1e-5 if dtype == "float32" else 3e-5
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=loss_tol)
        if dtype == "float32":
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(
                    np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5
                ),
                jax.device_get(new.params),
                jax.device_get(ref_params),
            )
            stats_tol = 1e-5
        else:
            update = lambda p: jax.tree.map(lambda a, b: a - b, jax.device_get(p), params0)  # noqa: E731
            _assert_close_in_bfloat16(update(ref_params), update(new.params))
            stats_tol = 1e-4
        jax.tree.map(
            lambda a, b, tol=stats_tol: np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), atol=tol, rtol=tol
            ),
            jax.device_get(new.batch_stats),
            jax.device_get(ref_stats),
        )


def _one_step(config, images, seed=3):
    """(metrics, new state) of one 8-device step from the seed's initial state (SGD 1e-2)."""
    tx = optax.sgd(1e-2)
    mesh = make_mesh()
    model = ts.build_model(config, SHAPE)
    state0 = jax.jit(lambda: ts.init_train_state(model, tx, seed))()
    step = make_train_step(model, tx, config, mesh)
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
    model = ts.build_model(config, SHAPE)

    @jax.jit  # one program, not op by op
    def kl_estimates(images):
        state0 = ts.init_train_state(model, optax.sgd(1e-2), seed=3)
        (mean, logvar), _ = model.apply(
            state0.variables, images, train=True, method="encode", mutable=["batch_stats"]
        )
        eps = _step_noise(state0, 1, model.latent_dim)[0]
        z = mean + jnp.exp(0.5 * logvar) * eps
        kl_mc = losses.gaussian_log_density(z, mean, logvar) - losses.gaussian_log_density(z)
        return kl_mc, losses.gaussian_kl(mean, logvar)

    kl_mc, kl = kl_estimates(jnp.asarray(images))
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
    init = jax.jit(lambda seed: ts.init_train_state(ts.build_model(config, SHAPE), tx, seed))
    batch = shard_batch(images, mesh)
    per_k, kls = [], []
    for k in (1, 8, 64):
        config.iwae_samples = k
        step = make_train_step(ts.build_model(config, SHAPE), tx, config, mesh)
        runs = [jax.device_get(step(replicate(init(100 + s), mesh), batch)[1]) for s in range(6)]
        per_k.append(np.array([m["loss"] for m in runs]))
        kls.append(np.array([m["kl"] for m in runs]))
    for a, b in ((0, 1), (1, 2)):
        d = per_k[a] - per_k[b]
        print(f"loss(K index {a}) - loss(K index {b}) per state: {d}")
        assert np.all(d > 0), d  # each of 6 paired draws (1/64 by chance if K did nothing)
    np.testing.assert_allclose(kls[0], kls[2], rtol=1e-6)


# ---------------------------------------------------------------------------
# Mixed precision: config.model.dtype = "bfloat16"
# ---------------------------------------------------------------------------

# Bounds on the difference between a bfloat16 step and the float32 step from the same state on
# the same batch (relative errors; see test_bfloat16_step_loss_and_gradients_match_float32_step).
BF16_LOSS_RTOL = 3e-4
BF16_GRAD_RTOL = 0.03  # all gradients together (L2)
BF16_LEAF_RTOL = 0.2  # each gradient leaf


def _mp_config(
    dtype: str,
    objective: str = "elbo",
    conv_impl: str = "auto",
    mlp: bool = False,
    vamp_dreg: bool = False,
):
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    config.model.dtype, config.model.conv_impl = dtype, conv_impl
    config.objective, config.iwae_samples = objective, 3
    if mlp:
        config.model.decoder_type, config.model.decoder_hidden_dims = "mlp", (32,)
    if vamp_dreg:
        config.model.prior, config.model.num_pseudo_inputs = "vamp", 5
        config.gradient_estimator = "dreg"
    return config


@pytest.mark.parametrize(
    ("objective", "conv_impl", "mlp", "vamp_dreg"),
    [
        ("elbo", "gemm", False, False),
        ("elbo", "xla", False, False),
        ("iwae", "gemm", False, False),
        ("iwae", "gemm", True, False),
        ("iwae", "gemm", False, True),
        ("vanilla_vae_loss", "gemm", False, False),
    ],
)
def test_bfloat16_step_multiplies_in_bfloat16_and_reduces_in_float32(
    objective, conv_impl, mlp, vamp_dreg
):
    """The traced 8-device bfloat16 training step (forward, backward, Adam) and evaluation
    step (also with the VampPrior and DReG): every matmul and convolution takes bfloat16
    operands only; no reduction (loss sums, log-likelihood and KL sums, logsumexp, the
    VampPrior's mixture, whose derivatives are float32 sums written as matmuls of
    ``Precision.HIGHEST``; BatchNorm statistics, bias gradients) takes a bfloat16 operand, and
    neither does any sum over devices that XLA inserted into the compiled step (BatchNorm
    statistics, gradients: ``all-reduce``s of float32 only; and no ``all-gather`` or
    ``all-to-all``: the step moves no activations between devices); the state comes out
    float32 as it went in. The float32 step computes nothing in bfloat16."""
    mesh, tx = make_mesh(), optax.adam(1e-3)
    images = jax.ShapeDtypeStruct((BATCH, *SHAPE), jnp.float32)
    for dtype in ("bfloat16", "float32"):
        config = _mp_config(dtype, objective, conv_impl, mlp, vamp_dreg)
        model = ts.build_model(config, SHAPE)
        state = ts.abstract_state(lambda m=model: ts.init_train_state(m, tx, 0), mesh)
        step = make_train_step(model, tx, config, mesh)
        eval_step = evaluate.make_eval_step(model, config, mesh)
        mask = jax.ShapeDtypeStruct((BATCH,), bool)
        offset = jax.ShapeDtypeStruct((), jnp.int32)
        eqns = [
            *equations(jax.make_jaxpr(step)(state, images)),
            *equations(jax.make_jaxpr(eval_step)(state.variables, images, mask, state.key, offset)),
        ]
        if dtype == "float32":
            assert not [e for e in eqns if BF16 in dtypes(e.invars) | dtypes(e.outvars)]
            continue
        products = [e for e in eqns if is_product(e)]
        assert len(products) >= 10
        assert all(dtypes(e.invars) == {BF16} for e in products), [
            (e.primitive.name, dtypes(e.invars)) for e in products
        ]
        reductions = [e for e in eqns if is_reduction(e)]
        assert {e.primitive.name for e in reductions} >= {"reduce_sum", "psum_invariant"}
        assert any(is_float32_sum(e) for e in reductions) == vamp_dreg
        leaked = [(e.primitive.name, e.source_info) for e in reductions if BF16 in dtypes(e.invars)]
        assert not leaked, leaked
        hlo = step.lower(state, images).compile().as_text()
        collectives = re.findall(r"= (.*?) (all-reduce|all-gather|all-to-all)(?:-start)?\(", hlo)
        assert {kind for _, kind in collectives} == {"all-reduce"}, collectives
        assert not [c for c in collectives if "bf16" in c[0]], collectives
        out_state, _ = jax.eval_shape(step, state, images)
        assert jax.tree.map(lambda a: a.dtype, out_state) == jax.tree.map(lambda a: a.dtype, state)
        kept = jax.tree.leaves((out_state.params, out_state.batch_stats, out_state.opt_state))
        assert {a.dtype for a in kept if jnp.issubdtype(a.dtype, jnp.floating)} == {F32}


def _gradient_recorder() -> optax.GradientTransformation:
    """An "optimizer" whose state is the step's gradient and whose update is zero: after one
    step, ``opt_state`` holds exactly the gradients the step computed."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def _step_and_grads(config, images):
    """(metrics, gradients, new BatchNorm statistics) of one 8-device step of ``config`` from
    the seed-3 initial state, on the host."""
    tx, mesh = _gradient_recorder(), make_mesh()
    model = ts.build_model(config, SHAPE)
    state0 = jax.jit(lambda: ts.init_train_state(model, tx, 3))()
    step = make_train_step(model, tx, config, mesh)
    new, metrics = step(replicate(state0, mesh), shard_batch(images, mesh))
    return jax.device_get((metrics, new.opt_state, new.batch_stats))


def _assert_close_in_bfloat16(want, got) -> float:
    """Gradients (or SGD updates) ``got`` of a bfloat16 step within bfloat16 rounding of
    ``want``: all leaves together within ``BF16_GRAD_RTOL`` (relative L2 error), and each leaf
    within ``BF16_LEAF_RTOL`` of its own norm plus 1e-3 of the largest leaf's norm. The second
    term is for small leaves, whose relative error grows with the cancellation in their sum:
    the conv biases that feed a BatchNorm (exact gradient 0; in bfloat16 the sum of the
    roundings of their 10^4-10^5 bfloat16 cotangents, measured up to 1e-4 of the largest
    leaf) and the latent heads' biases (measured: 0.04 on a norm of 0.19, 1/2000 of the
    largest). Returns the largest relative error of a leaf above 1e-4 of the largest."""
    flat = [np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)]) for g in (want, got)]
    total = np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[0])
    print(f"  all leaves: relative error {total:.3g}")
    assert total < BF16_GRAD_RTOL
    largest = max(float(np.linalg.norm(a)) for a in jax.tree.leaves(want))
    worst = 0.0
    pairs = zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True)
    for (path, a), b in pairs:
        assert b.dtype == F32
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        norm, err = np.linalg.norm(a), np.linalg.norm(a - b)
        name = jax.tree_util.keystr(path)
        print(f"  {name}: norm {norm:.3g}, error {err:.3g} (relative {err / norm:.3g})")
        assert err < BF16_LEAF_RTOL * norm + 1e-3 * largest, name
        if norm > 1e-4 * largest:
            worst = max(worst, err / norm)
    return worst


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_bfloat16_step_loss_and_gradients_match_float32_step(objective):
    """Same batch, same initial state: the bfloat16 step's loss is within 3e-4 (relative) of the
    float32 step's, its gradients within 3% (relative L2 error of all leaves together) and
    each leaf within 20%.

    Why these bounds. bfloat16 keeps 8 significant bits, so every activation, and every
    cotangent of the backward pass, is rounded by up to 2^-9. Measured here: the loss moves by
    3-8e-5 (relative), the whole gradient by ~0.8% and single leaves by 0.05-9% (the encoder's,
    whose cotangents went through every layer and two BatchNorm backward passes, the most; the
    large gradients of the decoder's last layers by < 0.3%). A leak of bfloat16 into a
    reduction fails them: the bias gradient of the last conv, summed in bfloat16 over its
    16 * 784 outputs (what the code did before biases were added in float32), was 29% off and
    put the whole gradient 9.6% off; per-example log-likelihoods (~540 nats, where the
    bfloat16 spacing is 4) summed from bfloat16 terms and rounded to bfloat16 moved the loss by
    6.8e-4 and the whole gradient by 2.2%, and an encoder kernel's by 26%."""
    images = (np.random.default_rng(5).random((BATCH, *SHAPE)) < 0.3).astype(np.float32)
    m32, g32, _ = _step_and_grads(_mp_config("float32", objective), images)
    m16, g16, _ = _step_and_grads(_mp_config("bfloat16", objective), images)
    loss32, loss16 = float(m32["loss"]), float(m16["loss"])
    rel = abs(loss16 / loss32 - 1.0)
    print(f"{objective}: loss f32 {loss32:.5f} bf16 {loss16:.5f} rel {rel:.2e}")
    assert 0.0 < rel < BF16_LOSS_RTOL  # > 0: the bfloat16 step does compute in bfloat16
    worst = _assert_close_in_bfloat16(g32, g16)
    assert worst > 1e-3  # bfloat16 really is used in the backward pass
