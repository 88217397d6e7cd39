"""Tests of jaxvae.losses against closed forms, Monte-Carlo estimates and scipy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import stats

from jaxvae import losses

# jax.enable_x64 is public from jax 0.8.0; jax 0.7 (the lower bound, and Colab's) has it only
# as jax.experimental.enable_x64.
_enable_x64 = getattr(jax, "enable_x64", None)
if _enable_x64 is None:
    from jax.experimental import enable_x64 as _enable_x64

# --------------------------------------------------------------------------------------
# A linear-Gaussian model with a closed-form marginal and posterior:
#   p(z) = N(0, I_D),  p(x|z) = N(W z + b, s2 I_P).
# W has orthogonal columns, so W^T W = diag(c^2) and the exact posterior is diagonal:
#   q*(z|x) = N(m, diag(v)),  v = 1 / (1 + c^2 / s2),  m = v * W^T (x - b) / s2.
# --------------------------------------------------------------------------------------


class LinearGaussian:
    def __init__(self, seed: int = 0, latent_dim: int = 3, data_dim: int = 6, s2: float = 0.3):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(data_dim, latent_dim)))  # orthonormal columns
        self.col_scale = np.array([1.5, 0.8, 2.0])[:latent_dim]
        self.W = q * self.col_scale  # W^T W = diag(col_scale^2)
        self.b = rng.normal(size=data_dim)
        self.s2 = s2
        self.latent_dim, self.data_dim = latent_dim, data_dim

    def sample_x(self, n: int, seed: int = 1) -> np.ndarray:
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(n, self.latent_dim))
        return z @ self.W.T + self.b + math.sqrt(self.s2) * rng.normal(size=(n, self.data_dim))

    def log_marginal(self, x: np.ndarray) -> np.ndarray:
        cov = self.W @ self.W.T + self.s2 * np.eye(self.data_dim)
        return stats.multivariate_normal(self.b, cov).logpdf(x)

    def posterior(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = 1.0 / (1.0 + self.col_scale**2 / self.s2)
        m = v * ((x - self.b) @ self.W) / self.s2
        return m, np.broadcast_to(np.log(v), m.shape)

    def decode_fn(self):
        W, b = jnp.asarray(self.W, jnp.float32), jnp.asarray(self.b, jnp.float32)
        return lambda z: z @ W.T + b

    def log_likelihood_fn(self):
        logvar = math.log(self.s2)
        return lambda x, out: losses.gaussian_log_likelihood(x, out, logvar, event_ndim=1)


def f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def iwae_jit(key: jax.Array, args: tuple, **options) -> jax.Array:
    """``losses.iwae_log_likelihood(key, *args, **options)`` as one compiled program (op by op,
    every primitive would be compiled on its own: hundreds of compilations)."""
    return jax.jit(lambda k: losses.iwae_log_likelihood(k, *args, **options))(key)


# ------------------------------------ KL ------------------------------------------------


def test_kl_is_zero_at_the_prior():
    mean = jnp.zeros((4, 7))
    assert np.all(np.asarray(losses.gaussian_kl(mean, jnp.zeros((4, 7)))) == 0.0)
    pm, plv = jnp.linspace(-2, 2, 7), jnp.linspace(-3, 3, 7)
    kl = losses.gaussian_kl(
        jnp.broadcast_to(pm, (4, 7)), jnp.broadcast_to(plv, (4, 7)), prior_mean=pm, prior_logvar=plv
    )
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)


def test_kl_standard_normal_matches_seed_formula():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    seed_formula = -0.5 * np.sum(1 + logvar - mean**2 - np.exp(logvar), axis=1)
    np.testing.assert_allclose(losses.gaussian_kl(*f32(mean, logvar)), seed_formula, rtol=1e-5)


def test_kl_matches_general_two_gaussian_formula():
    rng = np.random.default_rng(1)
    d = 5
    for _ in range(4):
        m1, lv1, m2, lv2 = rng.normal(size=(4, d)) * [[1.0], [1.5], [1.0], [1.5]]
        s1, s2 = np.diag(np.exp(lv1)), np.diag(np.exp(lv2))
        s2_inv = np.linalg.inv(s2)
        expected = 0.5 * (
            np.trace(s2_inv @ s1)
            + (m2 - m1) @ s2_inv @ (m2 - m1)
            - d
            + np.log(np.linalg.det(s2) / np.linalg.det(s1))
        )
        pm, plv = f32(m2, lv2)
        got = losses.gaussian_kl(*f32(m1, lv1), prior_mean=pm, prior_logvar=plv)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_kl_matches_monte_carlo_estimate():
    rng = np.random.default_rng(2)
    m1, lv1 = rng.normal(size=4), 0.5 * rng.normal(size=4)
    m2, lv2 = rng.normal(size=4), 0.5 * rng.normal(size=4)
    n = 400_000
    z = m1 + np.exp(0.5 * lv1) * rng.normal(size=(n, 4))
    log_ratio = stats.norm(m1, np.exp(0.5 * lv1)).logpdf(z).sum(-1) - stats.norm(
        m2, np.exp(0.5 * lv2)
    ).logpdf(z).sum(-1)
    mc, se = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    pm, plv = f32(m2, lv2)
    got = float(losses.gaussian_kl(*f32(m1, lv1), prior_mean=pm, prior_logvar=plv))
    assert abs(got - mc) < 5 * se, (got, mc, se)


def test_kl_gradients():
    rng = np.random.default_rng(3)
    with _enable_x64(True):
        args = tuple(jnp.asarray(a) for a in rng.normal(size=(4, 3, 5)))
        kl = lambda m, lv, pm, plv: losses.gaussian_kl(m, lv, prior_mean=pm, prior_logvar=plv)
        check_grads(jax.jit(kl), args, order=2, modes=["fwd", "rev"])
        check_grads(jax.jit(lambda m, lv: losses.gaussian_kl(m, lv)), args[:2], order=2)


def test_kl_is_finite_and_accurate_for_extreme_logvar():
    logvar = jnp.linspace(-30.0, 30.0, 61)[:, None] * jnp.ones((1, 3))
    mean = jnp.linspace(-5.0, 5.0, 61)[:, None] * jnp.ones((1, 3))
    kl, grads = jax.jit(  # one program, not op by op
        lambda m, lv: (
            losses.gaussian_kl(m, lv),
            jax.grad(lambda m, lv: losses.gaussian_kl(m, lv).sum(), argnums=(0, 1))(m, lv),
        )
    )(mean, logvar)
    assert np.all(np.isfinite(kl)) and all(np.all(np.isfinite(g)) for g in grads)
    lv, m = np.asarray(logvar, np.float64), np.asarray(mean, np.float64)
    expected = 0.5 * np.sum(np.exp(lv) - 1 - lv + m**2, axis=-1)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)
    # Near the prior there is no cancellation: KL = (e^d - 1 - d) / 2 to full precision,
    # on both sides of the series/expm1 switch at |d| = 0.01.
    d = np.array([-0.3, -0.0101, -0.0099, -1e-4, 1e-6, 1e-4, 0.0099, 0.0101, 0.3])
    tiny = jax.jit(losses.gaussian_kl)(jnp.zeros((9, 1)), jnp.asarray(d[:, None], jnp.float32))
    np.testing.assert_allclose(tiny, 0.5 * (np.expm1(d) - d), rtol=2e-5)


# --------------------------------- reparameterize ----------------------------------------


def test_reparameterize_moments():
    mean, logvar = jnp.array([0.5, -2.0, 3.0]), jnp.array([0.0, -1.0, 1.5])
    n = 200_000
    z = np.asarray(losses.reparameterize(jax.random.key(0), mean, logvar, num_samples=n))
    assert z.shape == (n, 3)
    var = np.exp(np.asarray(logvar))
    assert np.all(np.abs(z.mean(0) - mean) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(z.var(0) - var) < 5 * var * np.sqrt(2.0 / n))


def test_reparameterize_keys_and_shapes():
    mean, logvar = jnp.zeros((4, 2)), jnp.zeros((4, 2))
    a = losses.reparameterize(jax.random.key(1), mean, logvar)
    b = losses.reparameterize(jax.random.key(1), mean, logvar)
    c = losses.reparameterize(jax.random.key(2), mean, logvar)
    assert a.shape == (4, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert losses.reparameterize(jax.random.key(1), mean, logvar, num_samples=7).shape == (7, 4, 2)


def test_reparameterize_gradients_flow_to_mean_and_logvar():
    key = jax.random.key(3)
    mean, logvar = jnp.array([0.3, -0.2]), jnp.array([0.4, -1.0])
    eps = (losses.reparameterize(key, mean, logvar) - mean) / jnp.exp(0.5 * logvar)
    g_mean, g_logvar = jax.grad(
        lambda m, lv: jnp.sum(losses.reparameterize(key, m, lv)), argnums=(0, 1)
    )(mean, logvar)
    np.testing.assert_allclose(g_mean, 1.0)
    np.testing.assert_allclose(g_logvar, 0.5 * jnp.exp(0.5 * logvar) * eps, rtol=1e-6)


# --------------------------------- log-likelihoods ----------------------------------------


def test_bernoulli_log_likelihood_matches_scipy():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3.0, size=(2, 5, 4, 3, 1))
    x = (rng.uniform(size=(5, 4, 3, 1)) < 0.5).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-logits))
    expected = stats.bernoulli(p).logpmf(x).sum(axis=(-3, -2, -1))
    got = losses.bernoulli_log_likelihood(*f32(x, logits))
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_bernoulli_log_likelihood_is_stable_for_large_logits():
    logits = jnp.array([-1e4, -50.0, 50.0, 1e4])
    x1, x0 = jnp.ones(4), jnp.zeros(4)
    ll1 = losses.bernoulli_log_likelihood(x1, logits, event_ndim=0)
    ll0 = losses.bernoulli_log_likelihood(x0, logits, event_ndim=0)
    np.testing.assert_allclose(ll1, [-1e4, -50.0, -math.exp(-50.0), 0.0], rtol=1e-6)
    np.testing.assert_allclose(ll0, [0.0, -math.exp(-50.0), -50.0, -1e4], rtol=1e-6)
    g = jax.grad(lambda lg: losses.bernoulli_log_likelihood(x1, lg, event_ndim=1))(logits)
    assert np.all(np.isfinite(g))


def test_gaussian_log_likelihood_matches_scipy_with_constants():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4, 4, 2))
    mean = rng.normal(size=(3, 4, 4, 2))
    logvar = rng.normal(size=(3, 4, 4, 2))
    expected = stats.norm(mean, np.exp(0.5 * logvar)).logpdf(x).sum(axis=(1, 2, 3))
    got = losses.gaussian_log_likelihood(*f32(x, mean, logvar))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Scalar (fixed) observation noise, the default unit variance, and event_ndim=1.
    expected = stats.norm(mean, math.exp(0.5 * -1.3)).logpdf(x).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(
        losses.gaussian_log_likelihood(*f32(x, mean), -1.3), expected, rtol=1e-5
    )
    expected = stats.norm(mean, 1.0).logpdf(x).sum(axis=-1)
    got = losses.gaussian_log_likelihood(*f32(x, mean), event_ndim=1)
    assert got.shape == (3, 4, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_bits_per_dim():
    np.testing.assert_allclose(losses.bits_per_dim(784 * math.log(2.0) * 1.25, num_dims=784), 1.25)
    nll = jnp.array([100.0, 200.0])
    np.testing.assert_allclose(
        losses.bits_per_dim(nll, num_dims=784), np.asarray(nll) / 784 / np.log(2)
    )


# ------------------------ Monte-Carlo reconstruction and the ELBO -----------------------------


def test_mc_reconstruction_matches_closed_form_expectation():
    model = LinearGaussian()
    x = model.sample_x(4)
    rng = np.random.default_rng(6)
    mean, logvar = rng.normal(size=(4, 3)), rng.normal(scale=0.5, size=(4, 3))
    # E_q[log N(x; Wz + b, s2 I)] = -P/2 log(2 pi s2) - (|x - W m - b|^2 + tr(W S W^T)) / (2 s2)
    resid = x - mean @ model.W.T - model.b
    trace = np.sum(np.exp(logvar) * model.col_scale**2, axis=-1)
    expected = -0.5 * model.data_dim * np.log(2 * np.pi * model.s2) - (
        np.sum(resid**2, -1) + trace
    ) / (2 * model.s2)
    calls = []

    def decode(z):
        calls.append(z.shape)  # trace-time: one batched decode for all samples
        return model.decode_fn()(z)

    n = 20_000
    got = losses.mc_reconstruction(
        jax.random.key(0), decode, *f32(x, mean, logvar), model.log_likelihood_fn(), num_samples=n
    )
    assert calls == [(n, 4, 3)]
    # Per-sample spread of log p(x|z), to set a Monte-Carlo tolerance.
    z = mean + np.exp(0.5 * logvar) * rng.normal(size=(2000, 4, 3))
    ll = stats.norm(z @ model.W.T + model.b, math.sqrt(model.s2)).logpdf(x).sum(-1)
    se = ll.std(0) / math.sqrt(n)
    assert np.all(np.abs(np.asarray(got) - expected) < 5 * se), (got, expected, se)


def test_elbo_decomposition_and_exact_posterior():
    model = LinearGaussian()
    x = model.sample_x(5)
    m, lv = model.posterior(x)
    key = jax.random.key(1)
    value, rec, kl = losses.elbo(
        key, model.decode_fn(), *f32(x, m, lv), model.log_likelihood_fn(), num_samples=4, beta=0.7
    )
    np.testing.assert_allclose(value, rec - 0.7 * kl, rtol=1e-6)
    np.testing.assert_allclose(kl, losses.gaussian_kl(*f32(m, lv)))
    # With the exact posterior and beta=1 the ELBO is log p(x) in expectation.
    value, _, _ = losses.elbo(
        key, model.decode_fn(), *f32(x, m, lv), model.log_likelihood_fn(), num_samples=20_000
    )
    np.testing.assert_allclose(value, model.log_marginal(x), atol=0.05)


# ------------------------------------------- IWAE ------------------------------------------


def test_iwae_with_exact_posterior_is_exact_for_every_k():
    model = LinearGaussian()
    x = model.sample_x(8)
    m, lv = model.posterior(x)
    log_px = model.log_marginal(x)
    args = (model.decode_fn(), *f32(x, m, lv), model.log_likelihood_fn())
    for k, chunk in [(1, None), (10, 3), (100, None), (1000, 128)]:
        got = iwae_jit(jax.random.key(k), args, num_samples=k, chunk_size=chunk)
        np.testing.assert_allclose(got, log_px, rtol=2e-5, atol=2e-4)


def test_iwae_bound_tightens_with_k_for_a_perturbed_posterior():
    model = LinearGaussian()
    x = model.sample_x(16)
    m, lv = model.posterior(x)
    m, lv = m + 0.6, lv + 0.8  # a worse q: wider and shifted
    log_px = model.log_marginal(x)
    decode, ll = model.decode_fn(), model.log_likelihood_fn()
    x32, m32, lv32 = f32(x, m, lv)

    def mean_iwae(k: int, reps: int) -> float:
        keys = jax.random.split(jax.random.key(k), reps)
        fn = jax.jit(
            jax.vmap(
                lambda key: losses.iwae_log_likelihood(
                    key, decode, x32, m32, lv32, ll, num_samples=k, chunk_size=250
                )
            )
        )
        return float(np.mean(fn(keys)))

    gaps = [
        float(np.mean(log_px)) - mean_iwae(k, reps)
        for k, reps in [(1, 4000), (10, 400), (100, 40), (1000, 8)]
    ]
    # K=1 is the ELBO: log p(x) - KL(q || exact posterior), in expectation.
    exact_m, exact_lv = f32(*model.posterior(x))
    kl_to_exact = losses.gaussian_kl(m32, lv32, prior_mean=exact_m, prior_logvar=exact_lv)
    analytic_elbo = np.mean(log_px - np.asarray(kl_to_exact, np.float64))
    assert gaps[0] > 0
    np.testing.assert_allclose(float(np.mean(log_px)) - gaps[0], analytic_elbo, atol=0.05)
    # Each tenfold K at least shrinks the gap by a clear margin, and stays non-negative
    # (up to Monte-Carlo noise).
    print("IWAE gaps over K = 1, 10, 100, 1000:", gaps)
    for a, b in zip(gaps, gaps[1:], strict=False):
        assert b < 0.8 * a, gaps
    assert gaps[-1] > -0.01, gaps


def _iwae_noise(key, k, shape):
    """``[k, B, D]``: the documented noise of iwae_log_likelihood, sample j of example i from
    ``fold_in(fold_in(key, i), j)``, drawn one value vector at a time."""
    keys = [jax.random.fold_in(key, i) for i in range(shape[0])]
    return jnp.stack(
        [
            jnp.stack(
                [
                    jax.random.normal(jax.random.fold_in(keys[i], j), shape[1:])
                    for i in range(shape[0])
                ]
            )
            for j in range(k)
        ]
    )


def test_iwae_chunking_handles_remainders_and_large_k():
    model = LinearGaussian()
    x = model.sample_x(2)
    m, lv = model.posterior(x)
    m, lv = m + 0.3, lv + 0.3
    args = (model.decode_fn(), *f32(x, m, lv), model.log_likelihood_fn())
    # One chunk equals a single logsumexp over all K weights computed by hand.
    key, k = jax.random.key(7), 37
    got = iwae_jit(key, args, num_samples=k, chunk_size=k)
    # Sample j of example i comes from fold_in(fold_in(key, i), j).
    eps = np.asarray(_iwae_noise(key, k, (2, 3)))
    z = m + np.exp(0.5 * lv) * np.asarray(eps, np.float64)
    log_w = (
        stats.norm(z @ model.W.T + model.b, math.sqrt(model.s2)).logpdf(x).sum(-1)
        + stats.norm(0, 1).logpdf(z).sum(-1)
        - stats.norm(m, np.exp(0.5 * lv)).logpdf(z).sum(-1)
    )
    from scipy.special import logsumexp

    np.testing.assert_allclose(got, logsumexp(log_w, axis=0) - np.log(k), rtol=1e-5)
    # K = 5000 in chunks of 64 (79 chunks, the last partly masked) runs and is near log p(x).
    big = iwae_jit(key, args, num_samples=5000, chunk_size=64)
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(big, model.log_marginal(x), atol=0.05)


# ----------------------------- the IWAE bound (training objective) ---------------------------


def _log_joint_minus_log_q(model: LinearGaussian, x, m, lv, z) -> np.ndarray:
    """log p(x|z) + log p(z) - log q(z|x), in float64 with scipy; z: [K, B, D]."""
    x, m, lv, z = (np.asarray(a, np.float64) for a in (x, m, lv, z))
    return (
        stats.norm(z @ model.W.T + model.b, math.sqrt(model.s2)).logpdf(x).sum(-1)
        + stats.norm(0, 1).logpdf(z).sum(-1)
        - stats.norm(m, np.exp(0.5 * lv)).logpdf(z).sum(-1)
    )


def test_log_importance_weights_match_scipy_in_one_decode_call():
    model = LinearGaussian()
    x = model.sample_x(4)
    m, lv = model.posterior(x)
    x, m, lv = f32(x, m + 0.4, lv - 0.3)
    eps = jax.random.normal(jax.random.key(5), (7, 4, 3))
    calls = []

    def decode(z):
        calls.append(z.shape)
        return model.decode_fn()(z)

    log_w = losses.log_importance_weights(decode, x, m, lv, eps, model.log_likelihood_fn())
    assert calls == [(7, 4, 3)] and log_w.shape == (7, 4)
    z = m + np.exp(0.5 * np.asarray(lv)) * np.asarray(eps)
    np.testing.assert_allclose(
        log_w, _log_joint_minus_log_q(model, x, m, lv, z), rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError, match=r"\(7, 4, 2\).*\(4, 3\)"):
        losses.log_importance_weights(decode, x, m, lv, eps[..., :2], model.log_likelihood_fn())
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 3\)"):
        losses.log_importance_weights(decode, x, m, lv, eps[0], model.log_likelihood_fn())


def test_iwae_bound_at_k1_is_the_elbo_with_a_monte_carlo_kl():
    model = LinearGaussian()
    x = model.sample_x(5)
    exact_m, exact_lv = f32(*model.posterior(x))
    x, m, lv = f32(x, exact_m + 0.5, exact_lv + 0.7)  # a perturbed q
    dec, ll = model.decode_fn(), model.log_likelihood_fn()
    key = jax.random.key(13)

    # For one key: log p(x|z) + log p(z) - log q(z|x) at z = reparameterize(key, ...), and the
    # ELBO with the same key sees the same z: the two differ by KL - (log q(z) - log p(z)).
    bound = losses.iwae_bound(key, dec, x, m, lv, ll, num_samples=1)
    z = losses.reparameterize(key, m, lv, num_samples=1)
    assert bound.shape == (5,)
    np.testing.assert_allclose(
        bound, _log_joint_minus_log_q(model, x, m, lv, z)[0], rtol=1e-5, atol=1e-4
    )
    value, rec, kl = losses.elbo(key, dec, x, m, lv, ll, num_samples=1)
    mc_kl = losses.gaussian_log_density(z[0], m, lv) - losses.gaussian_log_density(z[0])
    np.testing.assert_allclose(bound, rec - mc_kl, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(bound - value, kl - mc_kl, rtol=1e-5, atol=1e-4)

    # Over many keys the K = 1 bound averages to the analytic-KL ELBO.
    n = 20_000
    keys = jax.random.split(jax.random.key(14), n)
    many = jax.jit(jax.vmap(lambda k: losses.iwae_bound(k, dec, x, m, lv, ll, num_samples=1)))(keys)
    mc, se = np.mean(many, axis=0), np.std(many, axis=0) / math.sqrt(n)
    # The exact ELBO: log p(x) - KL(q || exact posterior).
    kl_to_exact = losses.gaussian_kl(m, lv, prior_mean=exact_m, prior_logvar=exact_lv)
    exact_elbo = model.log_marginal(np.asarray(x, np.float64)) - np.asarray(kl_to_exact)
    assert np.all(np.abs(mc - exact_elbo) < 4 * se), (mc, exact_elbo, se)
    # ... and to losses.elbo, whose reconstruction term is itself a Monte-Carlo estimate.
    elbos = jax.jit(jax.vmap(lambda k: losses.elbo(k, dec, x, m, lv, ll)[0]))(
        jax.random.split(jax.random.key(15), n)
    )
    mc_elbo, se_elbo = np.mean(elbos, axis=0), np.std(elbos, axis=0) / math.sqrt(n)
    assert np.all(np.abs(mc - mc_elbo) < 4 * np.hypot(se, se_elbo)), (mc, mc_elbo, se, se_elbo)


def test_iwae_bound_increases_with_k_toward_log_px():
    model = LinearGaussian()
    x = model.sample_x(16)
    m, lv = model.posterior(x)
    log_px = float(np.mean(model.log_marginal(x)))
    dec, ll = model.decode_fn(), model.log_likelihood_fn()
    # The exact posterior: every weight is p(x), so the bound is exact for every K.
    for k in (1, 7, 50):
        got = jax.jit(lambda key, *a, k=k: losses.iwae_bound(key, dec, *a, ll, num_samples=k))(
            jax.random.key(k), *f32(x, m, lv)
        )
        np.testing.assert_allclose(got, model.log_marginal(x), rtol=2e-5, atol=2e-4)
    # A worse q (wider and shifted): E[L_1] < E[L_10] < E[L_100] <= log p(x).
    x32, m32, lv32 = f32(x, m + 0.6, lv + 0.8)
    means, ses = [], []
    for k, reps in [(1, 4000), (10, 1000), (100, 200)]:
        fn = jax.jit(
            jax.vmap(
                lambda key, k=k: losses.iwae_bound(key, dec, x32, m32, lv32, ll, num_samples=k)
            )
        )
        per_rep = np.mean(np.asarray(fn(jax.random.split(jax.random.key(100 + k), reps))), axis=1)
        means.append(per_rep.mean())
        ses.append(per_rep.std() / math.sqrt(reps))
    gaps = [log_px - v for v in means]
    print("IWAE bound gaps to log p(x) over K = 1, 10, 100:", gaps, "standard errors:", ses)
    for i in range(2):
        step = means[i + 1] - means[i]
        assert step > 4 * math.hypot(ses[i], ses[i + 1]), (means, ses)
        assert gaps[i + 1] < 0.8 * gaps[i], gaps
    assert all(gap > -3 * se for gap, se in zip(gaps, ses, strict=True)), (gaps, ses)


def test_iwae_bound_gradients():
    model = LinearGaussian(latent_dim=2, data_dim=3)
    x = model.sample_x(2)
    m, lv = model.posterior(x)
    m, lv, x = m + 0.3, lv - 0.2, x - model.b  # a perturbed q; the decoder is z -> W z
    ll = model.log_likelihood_fn()
    key = jax.random.key(21)

    def mean_bound(m, lv, w, x):
        return jnp.mean(losses.iwae_bound(key, lambda z: z @ w.T, x, m, lv, ll, num_samples=5))

    # float32: the gradient of the mean bound is finite and reaches every input.
    m32, lv32, w32, x32 = f32(m, lv, model.W, x)
    grads = jax.jit(jax.grad(mean_bound, argnums=(0, 1, 2)))(m32, lv32, w32, x32)
    assert all(g.shape == a.shape for g, a in zip(grads, (m32, lv32, w32), strict=True))
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)
    # float64: the gradient matches finite differences (the noise is fixed by the key).
    with _enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (m, lv, model.W))
        x64 = jnp.asarray(x, jnp.float64)
        check_grads(
            jax.jit(lambda m, lv, w: mean_bound(m, lv, w, x64)),
            args,
            order=1,
            modes=["fwd", "rev"],
        )


def test_iwae_bound_at_one_chunk_is_iwae_log_likelihood_with_its_noise():
    """``iwae_bound`` and the chunked estimator compute the same function of the noise."""
    model = LinearGaussian()
    x = model.sample_x(3)
    m, lv = model.posterior(x)
    dec, ll = model.decode_fn(), model.log_likelihood_fn()
    x32, m32, lv32 = f32(x, m + 0.3, lv + 0.3)
    key = jax.random.key(17)
    for k in (1, 12):

        @jax.jit  # one program, not op by op
        def both(key, eps, x, m, lv, k=k):
            log_w = losses.log_importance_weights(dec, x, m, lv, eps, ll)
            by_hand = jax.nn.logsumexp(log_w, axis=0) - np.log(k)
            chunked = losses.iwae_log_likelihood(
                key, dec, x, m, lv, ll, num_samples=k, chunk_size=k
            )
            return chunked, by_hand

        eps = _iwae_noise(key, k, m32.shape)
        np.testing.assert_allclose(*both(key, eps, x32, m32, lv32), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        losses.iwae_bound(key, dec, x32, m32, lv32, ll, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be a Python int .*got 2.5"):
        losses.iwae_bound(key, dec, x32, m32, lv32, ll, num_samples=2.5)
    with pytest.raises(TypeError, match="a static argument under jit"):  # traced
        jax.jit(lambda k: losses.iwae_bound(key, dec, x32, m32, lv32, ll, num_samples=k))(3)
    np.testing.assert_array_equal(  # a NumPy integer is an int
        losses.iwae_bound(key, dec, x32, m32, lv32, ll, num_samples=np.int64(3)),
        losses.iwae_bound(key, dec, x32, m32, lv32, ll, num_samples=3),
    )


def test_iwae_log_likelihood_does_not_depend_on_its_chunking():
    """Sample and batch chunking are memory settings: every split gives the same estimate
    (to float rounding), including blocks that do not divide the batch (padding)."""
    model = LinearGaussian()
    x = model.sample_x(7)
    m, lv = model.posterior(x)
    args = (model.decode_fn(), *f32(x, m + 0.4, lv + 0.5), model.log_likelihood_fn())
    key = jax.random.key(3)
    ref = iwae_jit(key, args, num_samples=50, chunk_size=50)
    for chunk, rows in [(1, None), (7, None), (16, 1), (50, 3), (13, 7), (64, 100)]:
        got = iwae_jit(key, args, num_samples=50, chunk_size=chunk, batch_chunk_size=rows)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5, err_msg=f"{chunk}, {rows}")
    # ... and a different key gives a different estimate (the comparison has teeth).
    other = iwae_jit(jax.random.key(4), args, num_samples=50, chunk_size=50)
    assert float(jnp.max(jnp.abs(other - ref))) > 1e-3
    with pytest.raises(ValueError, match="batch_chunk_size must be >= 1"):
        losses.iwae_log_likelihood(key, *args, num_samples=5, batch_chunk_size=0)


# ----------------------------------- vanilla VAE loss ---------------------------------------


def test_vanilla_vae_loss_matches_pytorch_formula():
    rng = np.random.default_rng(8)
    x, rec = rng.normal(size=(2, 6, 4, 4, 3))
    mu, log_var = rng.normal(size=(2, 6, 5))
    w = 0.00025
    recons_loss = np.mean((rec - x) ** 2)  # F.mse_loss, reduction='mean'
    kld_loss = np.mean(-0.5 * np.sum(1 + log_var - mu**2 - np.exp(log_var), axis=1), axis=0)
    loss, metrics = losses.vanilla_vae_loss(*f32(rec, x, mu, log_var), kld_weight=w)
    np.testing.assert_allclose(loss, recons_loss + w * kld_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["reconstruction_loss"], recons_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kld_loss, rtol=1e-5)
    assert float(metrics["kl"]) > 0


def test_vanilla_vae_loss_is_a_rescaled_negative_elbo():
    # The docstring's claim: with s2 = kld_weight * N / 2 and beta = 1,
    # loss * N / (2 s2) + (N/2) log(2 pi s2) == mean_b(-ELBO_b) for the same reconstruction.
    rng = np.random.default_rng(9)
    x, rec = f32(*rng.normal(size=(2, 6, 8, 8, 3)))
    mu, log_var = f32(*rng.normal(size=(2, 6, 5)))
    w, n = 0.00025, 8 * 8 * 3
    s2 = w * n / 2
    loss, _ = losses.vanilla_vae_loss(rec, x, mu, log_var, kld_weight=w)
    neg_elbo = -(
        losses.gaussian_log_likelihood(x, rec, math.log(s2)) - losses.gaussian_kl(mu, log_var)
    )
    lhs = float(loss) * n / (2 * s2) + n / 2 * math.log(2 * math.pi * s2)
    np.testing.assert_allclose(lhs, float(jnp.mean(neg_elbo)), rtol=1e-5)


# --------------------------------- jit / vmap / errors ---------------------------------------


def _all_functions():
    model = LinearGaussian()
    x = model.sample_x(3)
    m, lv = (a + 0.2 for a in model.posterior(x))
    x, m, lv = f32(x, m, lv)
    dec, ll = model.decode_fn(), model.log_likelihood_fn()
    key = jax.random.key(11)
    return {
        "reparameterize": (
            lambda k, m, lv, x: losses.reparameterize(k, m, lv, num_samples=3),
            (key, m, lv, x),
        ),
        "gaussian_kl": (
            lambda k, m, lv, x: losses.gaussian_kl(m, lv, prior_mean=0.5, prior_logvar=-0.2),
            (key, m, lv, x),
        ),
        "bernoulli": (
            lambda k, m, lv, x: losses.bernoulli_log_likelihood(
                (x > 0).astype(jnp.float32), x[..., ::-1], event_ndim=1
            ),
            (key, m, lv, x),
        ),
        "gaussian_ll": (
            lambda k, m, lv, x: losses.gaussian_log_likelihood(
                x, x[..., ::-1] * 0.5, 0.3, event_ndim=1
            ),
            (key, m, lv, x),
        ),
        "mc_reconstruction": (
            lambda k, m, lv, x: losses.mc_reconstruction(k, dec, x, m, lv, ll, num_samples=4),
            (key, m, lv, x),
        ),
        "elbo": (
            lambda k, m, lv, x: losses.elbo(k, dec, x, m, lv, ll, num_samples=2, beta=0.5),
            (key, m, lv, x),
        ),
        "iwae": (
            lambda k, m, lv, x: losses.iwae_log_likelihood(
                k, dec, x, m, lv, ll, num_samples=10, chunk_size=4
            ),
            (key, m, lv, x),
        ),
        "iwae_bound": (
            lambda k, m, lv, x: losses.iwae_bound(k, dec, x, m, lv, ll, num_samples=5),
            (key, m, lv, x),
        ),
        "log_importance_weights": (
            lambda k, m, lv, x: losses.log_importance_weights(
                dec, x, m, lv, jax.random.normal(k, (4, *m.shape)), ll
            ),
            (key, m, lv, x),
        ),
        "vanilla": (
            lambda k, m, lv, x: losses.vanilla_vae_loss(x * 0.9, x, m, lv, kld_weight=0.01),
            (key, m, lv, x),
        ),
    }


@pytest.mark.parametrize("name", list(_all_functions()))
def test_same_result_jitted_and_unjitted(name):
    fn, args = _all_functions()[name]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        fn(*args),
        jax.jit(fn)(*args),
    )


@pytest.mark.parametrize("name", list(_all_functions()))
def test_vmap_equals_a_loop(name):
    fn, (key, m, lv, x) = _all_functions()[name]
    keys = jax.random.split(key, 3)
    # vmap over a new leading axis of size 3 (each slice is a full batch of 3 examples).
    ms, lvs, xs = (
        m[None] + jnp.arange(3.0)[:, None, None] * 0.1,
        jnp.stack([lv] * 3),
        jnp.stack([x] * 3),
    )
    batched = jax.vmap(fn)(keys, ms, lvs, xs)
    looped = [fn(keys[i], ms[i], lvs[i], xs[i]) for i in range(3)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *looped)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), batched, stacked
    )


def test_mismatched_shapes_raise_at_trace_time():
    key = jax.random.key(0)
    m, lv = jnp.zeros((4, 3)), jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        jax.jit(losses.reparameterize)(key, m, lv)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        jax.jit(losses.gaussian_kl)(m, lv)
    x, out = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 1\).*\(2, 8, 8, 3\)"):
        jax.jit(losses.bernoulli_log_likelihood)(x, out)
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 1\).*\(2, 8, 8, 3\)"):
        jax.jit(losses.gaussian_log_likelihood)(x, out)
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 3\).*\(2, 8, 8, 1\)"):
        losses.vanilla_vae_loss(out, x, jnp.zeros((2, 3)), jnp.zeros((2, 3)), kld_weight=1.0)
    # A decoder whose output does not match x is caught inside the ELBO under jit.
    bad_decode = lambda z: jnp.zeros((*z.shape[:-1], 8, 8, 3))  # noqa: E731
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 1\).*\(1, 2, 8, 8, 3\)"):
        jax.jit(
            lambda k, x, m, lv: losses.elbo(
                k, bad_decode, x, m, lv, losses.bernoulli_log_likelihood
            )
        )(key, x, jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    # A batch mismatch between x and the posterior.
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 1\).*\(5, 3\)"):
        losses.elbo(
            key,
            bad_decode,
            x,
            jnp.zeros((5, 3)),
            jnp.zeros((5, 3)),
            losses.bernoulli_log_likelihood,
        )
    # A log-likelihood that forgets to sum over the event axes.
    per_pixel = lambda x, out: losses.bernoulli_log_likelihood(x, out, event_ndim=0)  # noqa: E731
    good_decode = lambda z: jnp.zeros((*z.shape[:-1], 8, 8, 1))  # noqa: E731
    with pytest.raises(ValueError, match="event_ndim"):
        losses.mc_reconstruction(
            key, good_decode, x, jnp.zeros((2, 3)), jnp.zeros((2, 3)), per_pixel
        )


def test_iwae_with_one_key_per_example_does_not_depend_on_the_device_or_batch():
    # One key per example: an example's estimate is the same inside shard_map on its device's
    # rows, in the whole batch, alone, and in blocks (the evaluation relies on this).
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    model = LinearGaussian()
    n_dev = len(jax.devices())
    x = model.sample_x(2 * n_dev)
    m, lv = (a + 0.2 for a in model.posterior(x))
    x, m, lv = f32(x, m, lv)
    dec, ll = model.decode_fn(), model.log_likelihood_fn()
    keys = losses.example_keys(jax.random.key(3), 2 * n_dev)

    def estimate(keys, x, m, lv, **kw):
        return losses.iwae_log_likelihood(keys, dec, x, m, lv, ll, num_samples=10, **kw)

    mesh = Mesh(jax.devices(), ("data",))
    sharded = jax.jit(
        jax.shard_map(
            lambda *a: estimate(*a, chunk_size=4),
            mesh=mesh,
            in_specs=(P("data"),) * 4,
            out_specs=P("data"),
        )
    )(keys, x, m, lv)
    whole = jax.jit(lambda *a: estimate(*a, chunk_size=3, batch_chunk_size=5))(keys, x, m, lv)
    one_program = jax.jit(estimate)
    alone = [one_program(*(a[i : i + 1] for a in (keys, x, m, lv))) for i in (0, 7)]
    np.testing.assert_allclose(sharded, whole, rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(alone), whole[np.array([0, 7])], rtol=1e-5)
    # A single key stands for example_keys(key, B).
    single = one_program(jax.random.key(3), x, m, lv)
    np.testing.assert_allclose(single, whole, rtol=1e-5)
    with pytest.raises(ValueError, match="one key per example"):
        estimate(keys[:3], x, m, lv)
