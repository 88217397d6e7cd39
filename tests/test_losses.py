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


# ------------------------------------ KL ------------------------------------------------


def test_kl_is_zero_at_the_prior():
    mean = jnp.zeros((4, 7))
    assert np.all(np.asarray(losses.gaussian_kl(mean, jnp.zeros((4, 7)))) == 0.0)
    pm, plv = jnp.linspace(-2, 2, 7), jnp.linspace(-3, 3, 7)
    kl = losses.gaussian_kl(jnp.broadcast_to(pm, (4, 7)), jnp.broadcast_to(plv, (4, 7)), pm, plv)
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
        got = losses.gaussian_kl(*f32(m1, lv1), *f32(m2, lv2))
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
    got = float(losses.gaussian_kl(*f32(m1, lv1, m2, lv2)))
    assert abs(got - mc) < 5 * se, (got, mc, se)


def test_kl_gradients():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a) for a in rng.normal(size=(4, 3, 5)))
        check_grads(jax.jit(losses.gaussian_kl), args, order=2, modes=["fwd", "rev"])
        check_grads(jax.jit(lambda m, lv: losses.gaussian_kl(m, lv)), args[:2], order=2)


def test_kl_is_finite_and_accurate_for_extreme_logvar():
    logvar = jnp.linspace(-30.0, 30.0, 61)[:, None] * jnp.ones((1, 3))
    mean = jnp.linspace(-5.0, 5.0, 61)[:, None] * jnp.ones((1, 3))
    kl = losses.gaussian_kl(mean, logvar)
    grads = jax.grad(lambda m, lv: losses.gaussian_kl(m, lv).sum(), argnums=(0, 1))(mean, logvar)
    assert np.all(np.isfinite(kl)) and all(np.all(np.isfinite(g)) for g in grads)
    lv, m = np.asarray(logvar, np.float64), np.asarray(mean, np.float64)
    expected = 0.5 * np.sum(np.exp(lv) - 1 - lv + m**2, axis=-1)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)
    # Near the prior there is no cancellation: KL = (e^d - 1 - d) / 2 to full precision,
    # on both sides of the series/expm1 switch at |d| = 0.01.
    d = np.array([-0.3, -0.0101, -0.0099, -1e-4, 1e-6, 1e-4, 0.0099, 0.0101, 0.3])
    tiny = losses.gaussian_kl(jnp.zeros((9, 1)), jnp.asarray(d[:, None], jnp.float32))
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
    np.testing.assert_allclose(losses.bits_per_dim(784 * math.log(2.0) * 1.25, 784), 1.25)
    nll = jnp.array([100.0, 200.0])
    np.testing.assert_allclose(losses.bits_per_dim(nll, 784), np.asarray(nll) / 784 / np.log(2))


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
        jax.random.key(0), decode, *f32(x, mean, logvar), model.log_likelihood_fn(), n
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
        key, model.decode_fn(), *f32(x, m, lv), model.log_likelihood_fn(), 4, beta=0.7
    )
    np.testing.assert_allclose(value, rec - 0.7 * kl, rtol=1e-6)
    np.testing.assert_allclose(kl, losses.gaussian_kl(*f32(m, lv)))
    # With the exact posterior and beta=1 the ELBO is log p(x) in expectation.
    value, _, _ = losses.elbo(
        key, model.decode_fn(), *f32(x, m, lv), model.log_likelihood_fn(), 20_000
    )
    np.testing.assert_allclose(value, model.log_marginal(x), atol=0.05)


# ------------------------------------------- IWAE ------------------------------------------


def test_iwae_with_exact_posterior_is_exact_for_every_k():
    model = LinearGaussian()
    x = model.sample_x(8)
    m, lv = model.posterior(x)
    log_px = model.log_marginal(x)
    for k, chunk in [(1, None), (10, 3), (100, None), (1000, 128)]:
        got = losses.iwae_log_likelihood(
            jax.random.key(k),
            model.decode_fn(),
            *f32(x, m, lv),
            model.log_likelihood_fn(),
            num_samples=k,
            chunk_size=chunk,
        )
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
                lambda key: losses.iwae_log_likelihood(key, decode, x32, m32, lv32, ll, k, 250)
            )
        )
        return float(np.mean(fn(keys)))

    gaps = [
        float(np.mean(log_px)) - mean_iwae(k, reps)
        for k, reps in [(1, 4000), (10, 400), (100, 40), (1000, 8)]
    ]
    # K=1 is the ELBO: log p(x) - KL(q || exact posterior), in expectation.
    analytic_elbo = np.mean(
        log_px - np.asarray(losses.gaussian_kl(m32, lv32, *f32(*model.posterior(x))), np.float64)
    )
    assert gaps[0] > 0
    np.testing.assert_allclose(float(np.mean(log_px)) - gaps[0], analytic_elbo, atol=0.05)
    # Each tenfold K at least shrinks the gap by a clear margin, and stays non-negative
    # (up to Monte-Carlo noise).
    print("IWAE gaps over K = 1, 10, 100, 1000:", gaps)
    for a, b in zip(gaps, gaps[1:], strict=False):
        assert b < 0.8 * a, gaps
    assert gaps[-1] > -0.01, gaps


def test_iwae_chunking_handles_remainders_and_large_k():
    model = LinearGaussian()
    x = model.sample_x(2)
    m, lv = model.posterior(x)
    m, lv = m + 0.3, lv + 0.3
    args = (model.decode_fn(), *f32(x, m, lv), model.log_likelihood_fn())
    # One chunk equals a single logsumexp over all K weights computed by hand.
    key, k = jax.random.key(7), 37
    got = losses.iwae_log_likelihood(key, *args, num_samples=k, chunk_size=k)
    eps = jax.random.normal(jax.random.fold_in(key, 0), (k, 2, 3))
    z = m + np.exp(0.5 * lv) * np.asarray(eps, np.float64)
    log_w = (
        stats.norm(z @ model.W.T + model.b, math.sqrt(model.s2)).logpdf(x).sum(-1)
        + stats.norm(0, 1).logpdf(z).sum(-1)
        - stats.norm(m, np.exp(0.5 * lv)).logpdf(z).sum(-1)
    )
    from scipy.special import logsumexp

    np.testing.assert_allclose(got, logsumexp(log_w, axis=0) - np.log(k), rtol=1e-5)
    # K = 5000 in chunks of 64 (79 chunks, the last partly masked) runs and is near log p(x).
    big = losses.iwae_log_likelihood(key, *args, num_samples=5000, chunk_size=64)
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(big, model.log_marginal(x), atol=0.05)


# ----------------------------------- vanilla VAE loss ---------------------------------------


def test_vanilla_vae_loss_matches_pytorch_formula():
    rng = np.random.default_rng(8)
    x, rec = rng.normal(size=(2, 6, 4, 4, 3))
    mu, log_var = rng.normal(size=(2, 6, 5))
    w = 0.00025
    recons_loss = np.mean((rec - x) ** 2)  # F.mse_loss, reduction='mean'
    kld_loss = np.mean(-0.5 * np.sum(1 + log_var - mu**2 - np.exp(log_var), axis=1), axis=0)
    loss, metrics = losses.vanilla_vae_loss(*f32(rec, x, mu, log_var), w)
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
    loss, _ = losses.vanilla_vae_loss(rec, x, mu, log_var, w)
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
        "reparameterize": (lambda k, m, lv, x: losses.reparameterize(k, m, lv, 3), (key, m, lv, x)),
        "gaussian_kl": (lambda k, m, lv, x: losses.gaussian_kl(m, lv, 0.5, -0.2), (key, m, lv, x)),
        "bernoulli": (
            lambda k, m, lv, x: losses.bernoulli_log_likelihood(
                (x > 0).astype(jnp.float32), x[..., ::-1], 1
            ),
            (key, m, lv, x),
        ),
        "gaussian_ll": (
            lambda k, m, lv, x: losses.gaussian_log_likelihood(x, x[..., ::-1] * 0.5, 0.3, 1),
            (key, m, lv, x),
        ),
        "mc_reconstruction": (
            lambda k, m, lv, x: losses.mc_reconstruction(k, dec, x, m, lv, ll, 4),
            (key, m, lv, x),
        ),
        "elbo": (lambda k, m, lv, x: losses.elbo(k, dec, x, m, lv, ll, 2, 0.5), (key, m, lv, x)),
        "iwae": (
            lambda k, m, lv, x: losses.iwae_log_likelihood(k, dec, x, m, lv, ll, 10, 4),
            (key, m, lv, x),
        ),
        "vanilla": (
            lambda k, m, lv, x: losses.vanilla_vae_loss(x * 0.9, x, m, lv, 0.01),
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
        losses.vanilla_vae_loss(out, x, jnp.zeros((2, 3)), jnp.zeros((2, 3)), 1.0)
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


def test_iwae_inside_shard_map_matches_per_shard_calls():
    # The data-parallel evaluation runs the IWAE scan inside shard_map (check_vma on):
    # each device's result must equal the plain call on its shard with its key.
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    model = LinearGaussian()
    n_dev = len(jax.devices())
    x = model.sample_x(2 * n_dev)
    m, lv = (a + 0.2 for a in model.posterior(x))
    x, m, lv = f32(x, m, lv)
    dec, ll = model.decode_fn(), model.log_likelihood_fn()

    def per_device(key, x, m, lv):
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        return losses.iwae_log_likelihood(key, dec, x, m, lv, ll, 10, 4)

    mesh = Mesh(jax.devices(), ("data",))
    sharded = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data"), P("data")),
            out_specs=P("data"),
        )
    )(jax.random.key(3), x, m, lv)
    expected = [
        losses.iwae_log_likelihood(
            jax.random.fold_in(jax.random.key(3), i),
            dec,
            x[2 * i : 2 * i + 2],
            m[2 * i : 2 * i + 2],
            lv[2 * i : 2 * i + 2],
            ll,
            10,
            4,
        )
        for i in range(n_dev)
    ]
    np.testing.assert_allclose(sharded, np.concatenate(expected), rtol=1e-5)
