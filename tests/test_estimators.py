"""Tests of the gradient estimators (DReG, STL) and of priors other than N(0, I) in
jaxvae.losses, on the linear-Gaussian model of test_losses.py (exact log p(x) and posterior).

The encoder is linear, q(z|x) = N(x A + c, diag e^l), and the decoder is z -> z W^T + b, so
every gradient is w.r.t. named parameters {A, c, l, W, b}. Statistical checks compare
Monte-Carlo averages over many keys (vmap) in float64, with tolerances from the standard
error of the same samples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from test_losses import LinearGaussian, _enable_x64

from jaxvae import losses

ENCODER = ("A", "c", "l")
sg = jax.lax.stop_gradient


def _exact_encoder(model: LinearGaussian) -> dict[str, np.ndarray]:
    """A, c, l with x A + c and l the exact posterior's mean and log-variance."""
    v = 1.0 / (1.0 + model.col_scale**2 / model.s2)
    a = model.W * v / model.s2
    return {"A": a, "c": -model.b @ a, "l": np.log(v)}


def _params(
    model: LinearGaussian, perturbation: float, *, pseudo_inputs: int = 0, dtype=jnp.float64
) -> dict:
    """The exact encoder moved by ``perturbation`` (0: exact), the true decoder, and, for a
    VampPrior, ``pseudo_inputs`` learned inputs ``u``."""
    rng = np.random.default_rng(0)
    p = _exact_encoder(model)
    p["A"] = p["A"] + perturbation * 0.3 * rng.normal(size=p["A"].shape)
    p["c"] = p["c"] + perturbation * 0.5
    p["l"] = p["l"] + perturbation * 0.7
    p.update(W=model.W, b=model.b)
    if pseudo_inputs:
        p["u"] = model.sample_x(pseudo_inputs, seed=5)
    return {k: jnp.asarray(v, dtype) for k, v in p.items()}


def _encode(p, x):
    mean = x @ p["A"] + p["c"]
    return mean, jnp.broadcast_to(p["l"], mean.shape)


def _decode(p):
    return lambda z: z @ p["W"].T + p["b"]


def _prior(p):
    """The VampPrior when ``p`` has pseudo-inputs ``u`` (sharing the encoder's parameters),
    else None (N(0, I))."""
    if "u" not in p:
        return None
    means, logvars = _encode(p, p["u"])
    return lambda z: losses.mixture_gaussian_log_density(z, means, logvars)


def _log_likelihood(model: LinearGaussian):
    return lambda x, out: losses.gaussian_log_likelihood(x, out, math.log(model.s2), event_ndim=1)


class Objectives:
    """Batch-mean objectives of the parameters and a key, for one data batch."""

    def __init__(self, model: LinearGaussian, batch: int = 4, dtype=jnp.float64):
        self.x = jnp.asarray(model.sample_x(batch), dtype)
        self.ll = _log_likelihood(model)

    def args(self, p):
        """``(decode_fn, x, mean, logvar, log_likelihood_fn)`` of the parameters."""
        mean, logvar = _encode(p, self.x)
        return _decode(p), self.x, mean, logvar, self.ll

    def iwae(self, p, key, *, num_samples, estimator="standard"):
        bound = losses.iwae_bound(
            key,
            *self.args(p),
            num_samples=num_samples,
            gradient_estimator=estimator,
            prior_log_density=_prior(p),
        )
        return jnp.mean(bound)

    def iwae_stl(self, p, key, *, num_samples):
        """A known-biased control: the IWAE bound of the path-derivative (STL) log weights."""
        decode, x, mean, logvar, ll = self.args(p)
        eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
        log_w = losses.log_importance_weights(
            decode, x, mean, logvar, eps, ll, gradient_estimator="stl"
        )
        return jnp.mean(jax.nn.logsumexp(log_w, axis=0))

    def elbo(self, p, key, *, estimator="standard", prior_log_density=None):
        value, _, _ = losses.elbo(
            key, *self.args(p), gradient_estimator=estimator, prior_log_density=prior_log_density
        )
        return jnp.mean(value)

    def dreg_reference(self, p, key, *, num_samples):
        """DReG by its definition, with two decodes: the encoder's gradient from
        sum_k sg(w~_k^2) log w_k (z live; q's density, decoder and prior stopped), the
        decoder's and the prior's from logsumexp_k log w_k at stopped z."""
        mean, logvar = _encode(p, self.x)
        eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
        z = mean + jnp.exp(0.5 * logvar) * eps

        def log_w(z, q):
            log_pz = losses.gaussian_log_density(z) if "u" not in q else _prior(q)(z)
            log_qz = losses.gaussian_log_density(z, sg(mean), sg(logvar))
            return self.ll(self.x, _decode(q)(z)) + log_pz - log_qz

        encoder_part = log_w(z, sg(p))
        model_part = log_w(sg(z), p)
        w = jax.nn.softmax(sg(model_part), axis=0)
        return jnp.mean(jnp.sum(w**2 * encoder_part, axis=0) + jax.nn.logsumexp(model_part, 0))


def _per_key_grads(fn, p, keys):
    """``{name: [num_keys, *shape]}``: the gradient of ``fn(p, key)`` for each key."""
    return jax.jit(jax.vmap(jax.grad(fn), in_axes=(None, 0)))(p, keys)


def _z_scores(a, b):
    """|mean(a - b)| / its standard error over the leading (key) axis, per component;
    0 where a == b for every key."""
    d = np.asarray(a - b).reshape(len(a), -1)
    m, se = d.mean(0), d.std(0, ddof=1) / math.sqrt(len(d))
    return np.where(se > 0, np.abs(m) / np.where(se > 0, se, 1.0), np.where(m == 0, 0.0, np.inf))


def _snr(g):
    """|mean| / std over the leading (key) axis, per component."""
    g = np.asarray(g).reshape(len(g), -1)
    return np.abs(g.mean(0)) / g.std(0, ddof=1)


# ------------------------------------------ DReG ---------------------------------------------


@pytest.mark.parametrize("prior", ["standard_normal", "vamp"])
def test_dreg_gradient_equals_the_two_decode_definition_for_every_key(prior):
    """One decode with the re-weighted path equals DReG written out with two decodes, for
    every parameter and key (rtol 1e-9, float64), also when the prior shares the encoder's
    parameters (VampPrior: their gradient has a DReG part and a standard part)."""
    model = LinearGaussian()
    with _enable_x64(True):
        p = _params(model, 1.0, pseudo_inputs=3 if prior == "vamp" else 0)
        obj = Objectives(model)
        keys = jax.random.split(jax.random.key(0), 16)
        got = _per_key_grads(lambda p, k: obj.iwae(p, k, num_samples=7, estimator="dreg"), p, keys)
        ref = _per_key_grads(lambda p, k: obj.dreg_reference(p, k, num_samples=7), p, keys)
        standard = _per_key_grads(lambda p, k: obj.iwae(p, k, num_samples=7), p, keys)
        for name in p:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-9, atol=1e-12, err_msg=name)
        # The decoder keeps the standard gradient; the encoder's differs from it.
        for name in ("W", "b"):
            np.testing.assert_allclose(got[name], standard[name], rtol=1e-9, err_msg=name)
        assert all(np.max(np.abs(got[n] - standard[n])) > 1e-3 for n in ENCODER)


@pytest.mark.parametrize("prior", ["standard_normal", "vamp"])
def test_dreg_and_stl_expected_gradients_equal_the_standard_ones(prior):
    """Unbiasedness: over 2000 keys the mean of (estimator - standard), paired by key, is
    within 5 standard errors of 0 for every parameter component (K = 10 for DReG; the
    one-sample ELBO with the analytic KL for STL). The IWAE bound of STL log weights, a
    known-biased estimator, fails the same check by far (z > 20): the check has teeth."""
    model = LinearGaussian()
    with _enable_x64(True):
        p = _params(model, 0.3, pseudo_inputs=3 if prior == "vamp" else 0)
        obj = Objectives(model)
        keys = jax.random.split(jax.random.key(1), 2000)
        standard = _per_key_grads(lambda p, k: obj.iwae(p, k, num_samples=10), p, keys)
        dreg = _per_key_grads(
            lambda p, k: obj.iwae(p, k, num_samples=10, estimator="dreg"), p, keys
        )
        z_dreg = {n: float(_z_scores(dreg[n], standard[n]).max()) for n in p}
        print(f"DReG - standard ({prior}), max |z| per parameter:", z_dreg)
        assert max(z_dreg.values()) < 5, z_dreg
        if prior == "standard_normal":
            biased = _per_key_grads(lambda p, k: obj.iwae_stl(p, k, num_samples=10), p, keys)
            z_biased = max(float(_z_scores(biased[n], standard[n]).max()) for n in ENCODER)
            print("IWAE with STL weights - standard, max |z| (encoder):", z_biased)
            assert z_biased > 20
        # STL against the standard ELBO gradient with the same prior (the analytic KL for
        # N(0, I), the Monte-Carlo KL for the VampPrior).

        def elbo(p, k, estimator):
            return obj.elbo(p, k, estimator=estimator, prior_log_density=_prior(p))

        standard = _per_key_grads(lambda p, k: elbo(p, k, "standard"), p, keys)
        stl = _per_key_grads(lambda p, k: elbo(p, k, "stl"), p, keys)
        z_stl = {n: float(_z_scores(stl[n], standard[n]).max()) for n in p}
        print(f"STL - standard ELBO ({prior}), max |z| per parameter:", z_stl)
        assert max(z_stl.values()) < 5, z_stl


def test_dreg_encoder_snr_is_higher_than_the_standard_at_k50():
    """Signal-to-noise ratio |mean| / std of each encoder gradient component over 1000 keys,
    K = 50, an encoder near (not at) the posterior: DReG's is higher for every component."""
    model = LinearGaussian()
    with _enable_x64(True):
        p = _params(model, 0.3)
        obj = Objectives(model)
        keys = jax.random.split(jax.random.key(2), 1000)
        snr = {}
        for estimator in ("standard", "dreg"):
            g = _per_key_grads(
                lambda p, k, e=estimator: obj.iwae(p, k, num_samples=50, estimator=e), p, keys
            )
            snr[estimator] = np.concatenate([_snr(g[n]) for n in ENCODER])
            groups = {n: float(np.mean(_snr(g[n]))) for n in ENCODER}
            print(
                f"K=50 encoder gradient SNR, {estimator}: mean per parameter "
                + ", ".join(f"{n} {v:.3f}" for n, v in groups.items())
                + f"; min {snr[estimator].min():.3f}, median {np.median(snr[estimator]):.3f}"
            )
        ratio = snr["dreg"] / snr["standard"]
        print(
            f"SNR dreg / standard per component: min {ratio.min():.2f}, median "
            f"{np.median(ratio):.2f}"
        )
        assert np.all(snr["dreg"] > snr["standard"]), snr


# ---------------------------------- the exact posterior --------------------------------------


def test_stl_and_dreg_encoder_gradients_vanish_at_the_exact_posterior():
    """Sticking the landing: with q the exact posterior, the encoder's STL gradient (ELBO,
    one sample) and DReG gradient (IWAE, K = 5) are zero for every key (float rounding,
    |g| < 1e-10 in float64), while the standard estimators' are not (max |g| > 0.1)."""
    model = LinearGaussian()
    with _enable_x64(True):
        p = _params(model, 0.0)
        obj = Objectives(model)
        keys = jax.random.split(jax.random.key(3), 64)
        cases = {
            "stl": lambda p, k: obj.elbo(p, k, estimator="stl"),
            "dreg": lambda p, k: obj.iwae(p, k, num_samples=5, estimator="dreg"),
            "elbo (analytic KL)": lambda p, k: obj.elbo(p, k),
            "elbo (MC KL)": lambda p, k: obj.elbo(
                p, k, prior_log_density=losses.gaussian_log_density
            ),
            "iwae": lambda p, k: obj.iwae(p, k, num_samples=5),
        }
        largest = {}
        for name, fn in cases.items():
            g = _per_key_grads(fn, p, keys)
            largest[name] = max(float(jnp.max(jnp.abs(g[n]))) for n in ENCODER)
        print("max |encoder gradient| over 64 keys at the exact posterior:", largest)
        assert largest["stl"] < 1e-10 and largest["dreg"] < 1e-10, largest
        assert min(largest[n] for n in list(cases)[2:]) > 0.1, largest


def test_a_prior_with_the_exact_posterior_gives_the_exact_log_likelihood():
    """A non-standard prior N(mu0, diag s0^2), given as a mixture of two equal components:
    with q its exact (diagonal) posterior every importance weight is p(x), so the IWAE
    bound (both estimators), iwae_log_likelihood and the Monte-Carlo-KL ELBO are log p(x)
    for every key (float64, rtol 1e-10)."""
    model = LinearGaussian()
    mu0, lv0 = np.array([0.5, -1.0, 0.2]), np.log([2.0, 0.5, 1.5])
    with _enable_x64(True):
        x = model.sample_x(5)
        cov = model.W @ np.diag(np.exp(lv0)) @ model.W.T + model.s2 * np.eye(model.data_dim)
        log_px = stats.multivariate_normal(model.W @ mu0 + model.b, cov).logpdf(x)
        # Posterior precision diag(e^-lv0 + c^2 / s2); mean v * (e^-lv0 mu0 + W^T (x - b) / s2).
        v = 1.0 / (np.exp(-lv0) + model.col_scale**2 / model.s2)
        m = v * (np.exp(-lv0) * mu0 + (x - model.b) @ model.W / model.s2)
        means, logvars = jnp.asarray(np.stack([mu0, mu0])), jnp.asarray(np.stack([lv0, lv0]))
        prior = lambda z: losses.mixture_gaussian_log_density(z, means, logvars)  # noqa: E731
        decode = lambda z: z @ jnp.asarray(model.W).T + jnp.asarray(model.b)  # noqa: E731
        ll = _log_likelihood(model)

        def estimates(key, x, m, lv):
            args = (decode, x, m, lv, ll)
            out = {
                f"iwae_bound {e}": losses.iwae_bound(
                    key, *args, num_samples=6, gradient_estimator=e, prior_log_density=prior
                )
                for e in ("standard", "dreg")
            }
            out["iwae_log_likelihood"] = losses.iwae_log_likelihood(
                key, *args, num_samples=10, chunk_size=4, prior_log_density=prior
            )
            for e in ("standard", "stl"):
                value, rec, kl = losses.elbo(
                    key, *args, num_samples=3, gradient_estimator=e, prior_log_density=prior
                )
                out[f"elbo {e}"], out[f"rec - kl {e}"] = value, rec - kl
            return out

        lv = np.broadcast_to(np.log(v), m.shape)
        got = jax.jit(estimates)(jax.random.key(4), *(jnp.asarray(a) for a in (x, m, lv)))
        for name, value in got.items():
            np.testing.assert_allclose(value, log_px, rtol=1e-10, err_msg=name)


# ------------------------------------------- values ------------------------------------------


def test_estimators_change_gradients_not_values():
    """The same key gives identical values (assert_array_equal, in one jitted program):
    iwae_bound "dreg" == "standard"; elbo "stl" == the Monte-Carlo-KL elbo
    (prior_log_density=gaussian_log_density), all three outputs, whose reconstruction is the
    analytic-KL elbo's; the explicit N(0, I) prior leaves log_importance_weights and
    iwae_log_likelihood unchanged. In float32 and float64."""
    model = LinearGaussian()
    gauss = losses.gaussian_log_density

    def pairs(key, p, x):
        mean, logvar = _encode(p, x)
        args = (_decode(p), x, mean, logvar, _log_likelihood(model))
        eps = jax.random.normal(key, (5, *mean.shape), mean.dtype)
        mc = losses.elbo(key, *args, num_samples=4, beta=0.7, prior_log_density=gauss)
        stl = losses.elbo(key, *args, num_samples=4, beta=0.7, gradient_estimator="stl")
        return {
            "iwae_bound": (
                losses.iwae_bound(key, *args, num_samples=6, gradient_estimator="dreg"),
                losses.iwae_bound(key, *args, num_samples=6),
            ),
            "elbo": (stl, mc),
            "reconstruction": (mc[1], losses.elbo(key, *args, num_samples=4, beta=0.7)[1]),
            "log_importance_weights": (
                losses.log_importance_weights(*args[:4], eps, args[4], prior_log_density=gauss),
                losses.log_importance_weights(*args[:4], eps, args[4]),
            ),
            "iwae_log_likelihood": (
                losses.iwae_log_likelihood(key, *args, num_samples=9, prior_log_density=gauss),
                losses.iwae_log_likelihood(key, *args, num_samples=9),
            ),
            "mc": mc,
        }

    for dtype, enable in ((jnp.float32, False), (jnp.float64, True)):
        with _enable_x64(enable):
            p, obj = _params(model, 1.0, dtype=dtype), Objectives(model, 3, dtype)
            got = jax.jit(pairs)(jax.random.key(5), p, obj.x)
            mc = got.pop("mc")
            np.testing.assert_allclose(mc[0], mc[1] - 0.7 * mc[2], rtol=1e-6)
            for name, (a, b) in got.items():
                assert all(v.dtype == dtype for v in jax.tree.leaves((a, b))), name
                jax.tree.map(np.testing.assert_array_equal, a, b)


def test_monte_carlo_kl_has_the_analytic_kl_as_its_expectation():
    """elbo with prior_log_density=gaussian_log_density estimates KL(q || N(0, I)) on its
    samples: over 20000 one-sample keys its mean is within 5 standard errors of gaussian_kl,
    and its ELBO's mean within 5 standard errors of the analytic-KL ELBO's."""
    model = LinearGaussian()
    with _enable_x64(True):
        p = _params(model, 1.0)
        args = Objectives(model).args(p)
        mean, logvar = args[2:4]

        def both(key):
            mc = losses.elbo(key, *args, prior_log_density=losses.gaussian_log_density)
            return mc, losses.elbo(key, *args)

        (mc_value, _, mc_kl), (value, _, kl) = jax.jit(jax.vmap(both))(
            jax.random.split(jax.random.key(6), 20_000)
        )
        for estimate, exact in ((mc_kl, kl), (mc_value, value)):
            d = np.asarray(estimate - exact)
            se = d.std(0, ddof=1) / math.sqrt(len(d))
            assert np.all(np.abs(d.mean(0)) < 5 * se), (d.mean(0), se)
        np.testing.assert_allclose(kl[0], losses.gaussian_kl(mean, logvar), rtol=1e-12)


# ----------------------------------------- mixtures ------------------------------------------


def test_mixture_gaussian_log_density():
    """One component, or M equal ones with any weights, is gaussian_log_density; the weights
    are normalised (shift-invariant; a 1-D mixture integrates to 1, |1 - integral| < 1e-8);
    it equals log sum_m pi_m N(z; mu_m, s_m^2) from scipy (rtol 1e-10). float64."""
    rng = np.random.default_rng(7)
    with _enable_x64(True):
        z = jnp.asarray(rng.normal(size=(6, 5, 3)))
        mu, lv = jnp.asarray(rng.normal(size=3)), jnp.asarray(0.5 * rng.normal(size=3))
        gauss = jax.jit(losses.gaussian_log_density)(z, mu, lv)
        mixture = jax.jit(losses.mixture_gaussian_log_density)  # one program per call
        np.testing.assert_allclose(mixture(z, mu[None], lv[None]), gauss, rtol=1e-12)
        equal = (jnp.tile(mu, (4, 1)), jnp.tile(lv, (4, 1)))
        for log_weights in (None, jnp.asarray(rng.normal(size=4))):
            got = mixture(z, *equal, log_weights=log_weights)
            np.testing.assert_allclose(got, gauss, rtol=1e-12)
        means, logvars = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(4, 3)))
        logits = jnp.asarray(rng.normal(size=4))
        got = mixture(z, means, logvars, log_weights=logits)
        np.testing.assert_allclose(
            mixture(z, means, logvars, log_weights=logits + 7.3), got, rtol=1e-12
        )
        pi = np.exp(logits) / np.exp(logits).sum()
        sd = np.exp(0.5 * np.asarray(logvars))
        dens = sum(
            pi[m] * stats.norm(np.asarray(means)[m], sd[m]).pdf(np.asarray(z)).prod(-1)
            for m in range(4)
        )
        np.testing.assert_allclose(got, np.log(dens), rtol=1e-10)
        grid = np.linspace(-15.0, 15.0, 30001)
        one_d = mixture(
            jnp.asarray(grid[:, None]), means[:, :1], logvars[:, :1], log_weights=logits
        )
        assert abs(np.trapezoid(np.exp(np.asarray(one_d)), grid) - 1.0) < 1e-8
        assert mixture(z[0, 0], means, logvars).shape == ()


def test_mixture_gaussian_derivatives_equal_autodiff_of_the_direct_sum():
    """The mixture's hand-written JVP (matrix products, no [N, M, D] residuals) equals
    autodiff of the plain broadcast sum: gradients w.r.t. z, means and logvars (float64, rtol
    1e-10), a JVP, and the Hessian in z (forward over reverse). Its float32 value stays exact
    for narrow components (posterior sd 0.01: < 1e-4 nats from float64, where the expanded
    quadratic form is off by ~0.1)."""
    rng = np.random.default_rng(11)

    def direct(z, means, logvars):
        diff = z[..., None, :] - means
        comps = -0.5 * jnp.sum(math.log(2 * math.pi) + logvars + diff**2 * jnp.exp(-logvars), -1)
        return jax.nn.logsumexp(comps, axis=-1) - math.log(means.shape[0])

    with _enable_x64(True):
        args = (
            jnp.asarray(rng.normal(size=(3, 4, 5))),
            jnp.asarray(rng.normal(size=(6, 5))),
            jnp.asarray(rng.normal(size=(6, 5))),
        )
        weights = jnp.asarray(rng.normal(size=(3, 4)))

        def scalar(f):
            return lambda *a: jnp.sum(weights * jnp.sin(f(*a)))

        # Under jit: one compiled program each, not hundreds of op-by-op ones.
        got = jax.jit(jax.grad(scalar(losses.mixture_gaussian_log_density), (0, 1, 2)))(*args)
        want = jax.jit(jax.grad(scalar(direct), argnums=(0, 1, 2)))(*args)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
        tangents = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
        jvp = jax.jit(jax.jvp, static_argnums=0)
        _, got_t = jvp(losses.mixture_gaussian_log_density, args, tangents)
        _, want_t = jvp(direct, args, tangents)
        np.testing.assert_allclose(got_t, want_t, rtol=1e-10, atol=1e-12)
        z0 = args[0][0, 0]
        np.testing.assert_allclose(
            jax.jit(jax.hessian(lambda z: losses.mixture_gaussian_log_density(z, *args[1:])))(z0),
            jax.jit(jax.hessian(lambda z: direct(z, *args[1:])))(z0),
            rtol=1e-10,
            atol=1e-12,
        )
        means = 1.5 * rng.normal(size=(50, 20))
        logvars = np.full((50, 20), 2 * math.log(0.01))
        z = means[rng.integers(0, 50, size=64)] + 0.01 * rng.normal(size=(64, 20))
        exact = jax.jit(direct)(jnp.asarray(z), jnp.asarray(means), jnp.asarray(logvars))
    f32 = jax.jit(losses.mixture_gaussian_log_density)(
        jnp.asarray(z, jnp.float32),
        jnp.asarray(means, jnp.float32),
        jnp.asarray(logvars, jnp.float32),
    )
    assert np.max(np.abs(np.asarray(f32, np.float64) - np.asarray(exact))) < 1e-4


# ------------------------------- in a Flax model, under shard_map ----------------------------


def test_estimators_inside_a_flax_method_with_batchnorm():
    """decode_fn a bound Flax method with training-mode BatchNorm (mutable state), under
    jax.jit(jax.value_and_grad) in float32. The loss is -(IWAE bound, K = 5) - (ELBO with
    the Monte-Carlo KL, 3 samples), with DReG and STL or with the standard estimators:
    the same value and batch statistics (rtol 1e-6), finite gradients, the same decoder
    gradient (rtol 1e-5) and a different encoder gradient."""
    import flax.linen as nn

    ll = lambda x, out: losses.gaussian_log_likelihood(x, out, event_ndim=1)  # noqa: E731

    class TinyVAE(nn.Module):
        def setup(self):
            self.encoder = nn.Dense(4)
            self.norm = nn.BatchNorm(use_running_average=False)
            self.decoder = nn.Dense(6)

        def decode(self, z):
            return self.decoder(self.norm(z))

        def __call__(self, x, key, iwae_estimator, elbo_estimator):
            mean, logvar = jnp.split(self.encoder(x), 2, axis=-1)
            args = (key, self.decode, x, mean, logvar, ll)
            bound = losses.iwae_bound(*args, num_samples=5, gradient_estimator=iwae_estimator)
            elbo, _, _ = losses.elbo(
                *args,
                num_samples=3,
                gradient_estimator=elbo_estimator,
                prior_log_density=losses.gaussian_log_density,
            )
            return bound + elbo

    model = TinyVAE()
    x = jnp.asarray(np.random.default_rng(8).normal(size=(8, 6)), jnp.float32)
    key = jax.random.key(9)
    init = jax.jit(model.init, static_argnums=(3, 4))  # one program, not op by op
    variables = init(jax.random.key(0), x, key, "standard", "standard")

    def loss(params, *estimators):
        value, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            key,
            *estimators,
            mutable=["batch_stats"],
        )
        return -jnp.mean(value), updates["batch_stats"]

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
    (value, batch_stats), grads = step(variables["params"], "dreg", "stl")
    (ref_value, ref_stats), ref_grads = step(variables["params"], "standard", "standard")
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves) and leaves[0].dtype == jnp.float32
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), batch_stats, ref_stats)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        {n: grads[n] for n in ("norm", "decoder")},
        {n: ref_grads[n] for n in ("norm", "decoder")},
    )
    kernel, ref_kernel = grads["encoder"]["kernel"], ref_grads["encoder"]["kernel"]
    assert float(jnp.max(jnp.abs(kernel - ref_kernel))) > 1e-4


def test_dreg_log_weights_inside_shard_map_match_the_unsharded_gradient():
    """As a data-parallel training step uses them: the global batch's noise sliced per
    device, log_importance_weights(..., gradient_estimator="dreg") reduced by logsumexp, the
    local sum over the global batch size, replicated parameters. Under shard_map over the
    test's 8 devices the gradient equals the unsharded one (float32: |difference| <= 1e-5 *
    the parameter's largest gradient entry)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    model = LinearGaussian()
    n = 2 * len(jax.devices())
    p, obj = _params(model, 1.0, dtype=jnp.float32), Objectives(model, n, jnp.float32)
    eps = jax.random.normal(jax.random.key(10), (5, n, model.latent_dim), jnp.float32)

    def loss(p, x, eps):
        mean, logvar = _encode(p, x)
        log_w = losses.log_importance_weights(
            _decode(p), x, mean, logvar, eps, obj.ll, gradient_estimator="dreg"
        )
        return -jnp.sum(jax.nn.logsumexp(log_w, axis=0)) / n

    mesh = Mesh(jax.devices(), ("data",))
    sharded = jax.jit(
        jax.shard_map(
            jax.grad(loss), mesh=mesh, in_specs=(P(), P("data"), P(None, "data")), out_specs=P()
        )
    )(p, obj.x, eps)
    expected = jax.jit(jax.grad(loss))(p, obj.x, eps)
    # float32 sums in another order: a tolerance relative to each gradient's largest entry.
    for name in p:
        scale = float(jnp.max(jnp.abs(expected[name])))
        np.testing.assert_allclose(sharded[name], expected[name], rtol=0, atol=1e-5 * scale)


# -------------------------------------------- errors -----------------------------------------


def test_errors():
    model = LinearGaussian()
    p = _params(model, 1.0, dtype=jnp.float32)
    args = (jax.random.key(0), *Objectives(model, 2, jnp.float32).args(p))
    with pytest.raises(ValueError, match="gradient_estimator must be one of.*'stl'"):
        losses.iwae_bound(*args, num_samples=2, gradient_estimator="stl")
    with pytest.raises(ValueError, match="gradient_estimator must be one of.*'dreg'"):
        losses.elbo(*args, gradient_estimator="dreg")
    with pytest.raises(ValueError, match=r"prior_log_density\(z\) returned shape \(2, 2, 3\)"):
        losses.iwae_bound(*args, num_samples=2, prior_log_density=lambda z: z)
    mixture = losses.mixture_gaussian_log_density
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        mixture(jnp.zeros(3), jnp.zeros((4, 3)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"z.shape=\(2,\) and means.shape=\(4, 3\)"):
        mixture(jnp.zeros(2), jnp.zeros((4, 3)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"log_weights.shape=\(3,\)"):
        mixture(jnp.zeros(3), jnp.zeros((4, 3)), jnp.zeros((4, 3)), log_weights=jnp.zeros(3))
