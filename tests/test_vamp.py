"""The VampPrior (``config.model.prior = "vamp"``) and the gradient estimators
(``config.gradient_estimator``) in the model, the training step and the evaluation.

The pure functions (``losses.mixture_gaussian_log_density``, DReG and STL) are tested against
closed forms in tests/test_estimators.py; the 8-device steps against references written from the
definitions in tests/test_train_step.py; resuming in tests/test_train.py.
"""

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from test_train_step import BATCH, SHAPE, _step_and_grads, _vamp_log_density

from jaxvae import config_utils, evaluate, losses, models
from jaxvae import train_state as ts
from jaxvae.mesh import make_mesh

ROOT = Path(__file__).resolve().parents[1]
M = 5  # pseudo-inputs of the tiny models


def _config(objective="elbo", estimator="standard", prior="vamp", num_samples=3):
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    config.objective, config.gradient_estimator = objective, estimator
    config.model.prior, config.model.num_pseudo_inputs = prior, M
    config.iwae_samples = num_samples
    config_utils.validate(config, num_devices=8)
    return config


def _images(seed: int, n: int = BATCH) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, *SHAPE)) < 0.3).astype(np.float32)


def _variables(model, seed=0, **params):
    """Initial variables of ``model`` with the given ``params`` entries replaced."""
    x, key = jnp.zeros((1, *model.image_shape)), jax.random.key(seed)
    v = jax.jit(model.init)(key, x, key)
    return {**v, "params": {**v["params"], **params}}


def _tiny_model(**kw):
    common = dict(latent_dim=4, hidden_dims=(8, 16), image_shape=SHAPE, likelihood="bernoulli")
    return models.VAE(**{**common, "output_activation": "none", **kw})


def _split(grads):
    """The gradients of the encoder, of the decoder and (VampPrior) of the pseudo-inputs."""
    return grads["encoder"], grads["decoder"], grads.get("pseudo_inputs")


def _close(a, b, rtol=1e-5):
    """``|a - b| <= rtol |b| + atol`` elementwise, ``atol`` the float32 rounding floor of the
    whole tree ``b``: 1e-6 of its largest entry (at least 1e-6). A gradient that is exactly zero
    in exact arithmetic (the bias of a convolution feeding training-mode BatchNorm, which the
    normalisation removes) holds only rounding noise, as large as the gradients it was summed
    with allow, and another compilation of the same math rounds it differently."""
    scale = max([1.0] + [float(np.abs(x).max()) for x in jax.tree.leaves(b) if np.size(x)])
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-6 * scale), a, b)


def _relative_difference(a, b) -> float:
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (a, b)]
    return float(np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[1]))


# ------------------------------------------ model --------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vamp_adds_only_the_pseudo_inputs_to_the_standard_tree(dtype):
    """prior="standard" (the default) has exactly the encoder and decoder; "vamp" adds one
    float32 parameter ``pseudo_inputs [M, H, W, C]`` (also in bfloat16), initialised as
    0.01 * N(0, 1), and leaves every other variable as the standard model initialises it
    (Flax derives each parameter's key from its name)."""
    key, x = jax.random.key(0), jnp.zeros((1, *SHAPE))
    standard = jax.jit(_tiny_model(dtype=dtype).init)(key, x, key)
    vamp = jax.jit(_tiny_model(dtype=dtype, prior="vamp", num_pseudo_inputs=50).init)(key, x, key)
    assert _tiny_model().prior == "standard"
    assert set(standard["params"]) == {"encoder", "decoder"}
    assert set(vamp["params"]) == {"encoder", "decoder", "pseudo_inputs"}
    u = vamp["params"].pop("pseudo_inputs")
    assert u.shape == (50, *SHAPE) and u.dtype == jnp.float32
    n = u.size  # 39,200 draws: their mean within 5 standard errors of 0, their std within 2%
    assert abs(float(u.mean())) < 5 * models.PSEUDO_INPUT_INIT_STD / math.sqrt(n)
    assert abs(float(u.std()) / models.PSEUDO_INPUT_INIT_STD - 1) < 0.02
    jax.tree.map(np.testing.assert_array_equal, vamp, standard)


def test_bad_prior_fields_raise():
    with pytest.raises(ValueError, match="prior must be one of"):
        _tiny_model(prior="gmm")
    with pytest.raises(ValueError, match="num_pseudo_inputs must be >= 1"):
        _tiny_model(prior="vamp", num_pseudo_inputs=0)
    with pytest.raises(ValueError, match="no pseudo-inputs"):
        model = _tiny_model()
        model.apply(_variables(model), method="pseudo_posteriors")


def test_prior_is_the_mixture_of_the_posteriors_at_the_pseudo_inputs_in_eval_mode():
    """``prior_log_density(z)`` against scipy in float64: one pseudo-input gives the Gaussian
    with that posterior's mean and variance; two give the equal mixture of theirs. The
    posteriors are the encoder's with BatchNorm's running statistics (made non-trivial here,
    so that batch statistics would give other ones). The standard prior is N(0, I)."""
    rng = np.random.default_rng(0)
    for m in (1, 2):
        model = _tiny_model(prior="vamp", num_pseudo_inputs=m)
        v = _variables(model, pseudo_inputs=jnp.asarray(_images(m, n=m)))
        v["batch_stats"] = jax.tree.map(
            lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype), v["batch_stats"]
        )

        @jax.jit  # one program, not op by op
        def encodings(v, model=model):
            u = v["params"]["pseudo_inputs"]
            eval_mode = model.apply(v, u, train=False, method="encode")
            posteriors = model.apply(v, method="pseudo_posteriors")
            (mu_train, _), _ = model.apply(
                v, u, train=True, method="encode", mutable=["batch_stats"]
            )
            return eval_mode, posteriors, mu_train

        (mu, lv), posteriors, mu_train = encodings(v)
        jax.tree.map(np.testing.assert_array_equal, posteriors, (mu, lv))
        if m > 1:  # one example has no batch variance: train mode only for m > 1
            assert np.abs(mu_train - mu).max() > 1e-2
        z = np.asarray(mu[0]) + rng.normal(size=(6, 3, 4))
        want = np.log(
            sum(stats.multivariate_normal(mu[i], np.diag(np.exp(lv[i]))).pdf(z) for i in range(m))
            / m
        )
        prior = jax.jit(functools.partial(model.apply, method="prior_log_density"))
        got = prior(v, jnp.asarray(z, jnp.float32))
        assert got.shape == (6, 3)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    standard = _tiny_model()
    got = standard.apply(_variables(standard), jnp.asarray(z), method="prior_log_density")
    np.testing.assert_allclose(got, stats.multivariate_normal(np.zeros(4)).logpdf(z), rtol=1e-5)


def test_sample_draws_a_component_then_its_posterior():
    """``sample_prior`` of the VampPrior. With the log-variance head fixed at -30, every
    posterior is a point: each of 4,000 samples is one of the 4 components' means, and each
    mean is drawn 1/4 of the time (counts within 5 standard deviations). With both heads fixed
    (every component N(b, diag e^c)), the samples have that mean and variance (within 5
    standard errors). ``sample`` decodes them into mean images."""
    model = _tiny_model(prior="vamp", num_pseudo_inputs=4)
    n, key = 4000, jax.random.key(1)
    enc = _variables(model)["params"]["encoder"]
    fixed = lambda head, bias: {  # noqa: E731
        head: {"kernel": jnp.zeros_like(enc[head]["kernel"]), "bias": jnp.asarray(bias)}
    }
    point = {**enc, **fixed("fc_var", jnp.full(4, -30.0))}
    v = _variables(model, encoder=point, pseudo_inputs=jnp.asarray(_images(4, n=4)))
    means, _ = jax.jit(functools.partial(model.apply, method="pseudo_posteriors"))(v)
    assert float(jnp.min(jnp.abs(means[:, None] - means[None]).max(-1) + 9 * jnp.eye(4))) > 1e-2
    z = np.asarray(jax.jit(lambda v: model.apply(v, key, n, method="sample_prior"))(v))
    distance = np.abs(z[:, None, :] - np.asarray(means)[None]).max(-1)  # [n, 4]
    assert distance.min(1).max() < 1e-5
    counts = np.bincount(distance.argmin(1), minlength=4)
    assert np.all(np.abs(counts - n / 4) < 5 * math.sqrt(n * 3 / 16)), counts

    b, c = np.array([1.0, -2.0, 0.5, 3.0]), np.log([0.25, 1.0, 4.0, 0.5])
    v = _variables(model, encoder={**enc, **fixed("fc_mu", b), **fixed("fc_var", c)})
    z = np.asarray(jax.jit(lambda v: model.apply(v, key, n, method="sample_prior"))(v), np.float64)
    var = np.exp(c)
    assert np.all(np.abs(z.mean(0) - b) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(z.var(0) / var - 1) < 5 * math.sqrt(2 / n))

    @jax.jit  # one program, not op by op
    def images_and_decoded(v):
        decoded = model.apply(v, model.apply(v, key, 3, method="sample_prior"), method="decode")
        return model.apply(v, key, 3, method="sample"), decoded

    images, decoded = images_and_decoded(v)
    np.testing.assert_allclose(images, jax.nn.sigmoid(decoded), atol=1e-6)


# --------------------------------------- training step ---------------------------------------


def test_pseudo_inputs_leave_the_batch_statistics_alone():
    """An ELBO step with the VampPrior and one with N(0, I), from the same initial encoder and
    decoder on the same batch: the same BatchNorm statistics and reconstruction (the
    pseudo-inputs are encoded with the running statistics), another loss and KL, and the
    prior's gradient reaches the pseudo-inputs and adds to the encoder's."""
    images = _images(1)
    mv, gv, sv = _step_and_grads(_config(prior="vamp"), images)
    ms, gs, ss = _step_and_grads(_config(prior="standard"), images)
    _close(sv, ss, rtol=1e-6)
    np.testing.assert_allclose(mv["reconstruction"], ms["reconstruction"], rtol=1e-6)
    assert abs(mv["loss"] - ms["loss"]) > 1e-2 and abs(mv["kl"] - ms["kl"]) > 1e-2
    assert float(np.abs(gv["pseudo_inputs"]).max()) > 0
    _close(gv["decoder"], gs["decoder"], rtol=1e-4)  # the same z: only the prior differs
    assert _relative_difference(gv["encoder"], gs["encoder"]) > 1e-3


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_dreg_step_has_the_standard_value_and_changes_only_the_encoder_gradient(prior):
    """The IWAE step (K = 3) with ``gradient_estimator="dreg"`` and with "standard", from the
    same state on the same batch: the same loss and metrics, the reconstruction term included
    (it is recorded inside the bound's computation, under the step's jit and value_and_grad,
    so DReG's custom_vjp must not capture it), the same BatchNorm statistics, the same
    gradients of the decoder and of the pseudo-inputs (they get the standard gradient), and
    another encoder gradient."""
    images = _images(2)
    md, gd, sd = _step_and_grads(_config("iwae", "dreg", prior), images)
    ms, gs, ss = _step_and_grads(_config("iwae", "standard", prior), images)
    for k in ("loss", "reconstruction", "kl", "neg_elbo"):
        np.testing.assert_allclose(md[k], ms[k], rtol=1e-6, err_msg=k)
    _close(sd, ss, rtol=1e-6)
    (enc_d, dec_d, u_d), (enc_s, dec_s, u_s) = _split(gd), _split(gs)
    _close((dec_d, u_d), (dec_s, u_s))
    assert _relative_difference(enc_d, enc_s) > 1e-2


def test_stl_elbo_step_is_the_dreg_step_at_one_sample():
    """With the VampPrior: the STL ELBO step, the DReG IWAE step at K = 1 and the standard IWAE
    step at K = 1 (the ELBO with a Monte-Carlo KL, on the same noise) have the same loss; STL
    and DReG at K = 1 the same gradients; the standard estimator the same decoder and
    pseudo-input gradients but another encoder gradient."""
    images = _images(3)
    stl = _step_and_grads(_config("elbo", "stl"), images)
    dreg = _step_and_grads(_config("iwae", "dreg", num_samples=1), images)
    standard = _step_and_grads(_config("iwae", "standard", num_samples=1), images)
    for m, _, _ in (dreg, standard):
        np.testing.assert_allclose(m["loss"], stl[0]["loss"], rtol=1e-6)
    _close(dreg[1], stl[1])
    enc, dec, u = _split(standard[1])
    _close((dec, u), _split(stl[1])[1:])
    assert _relative_difference(enc, stl[1]["encoder"]) > 1e-2


# ----------------------------------------- evaluation ----------------------------------------


def test_eval_step_uses_the_vamp_prior_in_the_elbo_and_the_iwae_estimate():
    """The 8-device evaluation step of a VampPrior model against its definition on one device:
    with example ``j``'s keys ``split(fold_in(key, j))``, the ELBO is ``log w`` at ``eps =
    normal(key_0, (1, D))`` (the KL by Monte Carlo, ``log q - log p``) and the IWAE estimate
    ``logsumexp_k log w_k - log K`` at ``eps_k = normal(fold_in(key_1, k), (D,))``, with the
    VampPrior of ``_vamp_log_density`` and the model in eval mode."""
    config = _config()
    config.eval.iwae_samples = k = 4
    model = ts.build_model(config, SHAPE)
    v = _variables(model, pseudo_inputs=jnp.asarray(_images(5, n=M)))
    images, mask = _images(6), np.arange(BATCH) < 13  # 3 padded rows
    key, offset = jax.random.key(7), 32

    ll = models.make_log_likelihood_fn("bernoulli")

    @jax.jit  # the definition as one program, not hundreds of op-by-op ones
    def definition(v, images):
        keys = jax.vmap(jax.random.split)(losses.example_keys(key, BATCH, offset=offset))
        mean, logvar = model.apply(v, images, method="encode")
        d = mean.shape[-1]
        eps_elbo = jax.vmap(lambda kk: jax.random.normal(kk, (1, d)))(keys[:, 0])  # [B, 1, D]
        eps_iwae = jax.vmap(
            lambda kk: jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(kk, i), (d,)))(
                jnp.arange(k)
            )
        )(keys[:, 1])  # [B, K, D]

        def log_w(eps):  # [K, B, D] -> ([K, B] log w, [K, B] log q - log p, N(0, I)'s)
            z = mean + jnp.exp(0.5 * logvar) * eps
            log_qz = losses.gaussian_log_density(z, mean, logvar)
            kl = log_qz - _vamp_log_density(model, v, z)
            kl_standard = log_qz - losses.gaussian_log_density(z)
            return ll(images, model.apply(v, z, method="decode")) - kl, kl, kl_standard

        elbo, kl, kl_standard = (a[0] for a in log_w(jnp.swapaxes(eps_elbo, 0, 1)))
        log_px = jax.nn.logsumexp(log_w(jnp.swapaxes(eps_iwae, 0, 1))[0], axis=0) - np.log(k)
        return {"neg_elbo": -elbo, "kl": kl, "nll_iwae": -log_px}, kl_standard

    want, kl_standard = definition(v, images)
    kl = want["kl"]
    assert float(jnp.abs(kl - kl_standard).min()) > 1e-2  # the prior matters here

    got = evaluate.make_eval_step(model, config, make_mesh())(v, images, mask, key, offset)
    for name, per_example in want.items():
        np.testing.assert_allclose(
            got[name], np.sum(np.where(mask, per_example, 0)), rtol=1e-5, err_msg=name
        )


def test_decoder_bytes_per_sample_counts_the_vamp_prior():
    """The IWAE memory plan sizes decoder calls by XLA's bytes per sample of decode +
    log-likelihood + log prior. The VampPrior's logsumexp holds ``M`` float32 per sample: with
    the likelihood recipe's MLP decoder (9,416 bytes per sample here), 500 components fit in
    the decoder's own buffers, 5,000 do not and count in full."""
    config = config_utils.load_config_file(ROOT / "configs" / "mnist_vamp.py")
    ll = models.make_log_likelihood_fn("bernoulli")
    sizes = {}
    for prior, m in (("standard", 500), ("vamp", 500), ("vamp", 5000)):
        config.model.prior, config.model.num_pseudo_inputs = prior, m
        model = ts.build_model(config, SHAPE)
        variables = evaluate.abstract_variables(model)
        sizes[prior, m] = evaluate.decoder_bytes_per_sample(model, variables, ll)
    print(sizes)
    assert sizes["vamp", 500] >= sizes["standard", 500] >= 4 * 512
    assert sizes["vamp", 5000] >= 4 * 5000 > sizes["standard", 500]
