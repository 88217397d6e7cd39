"""jaxvae.models: seed parity of shapes, any image size, the API, BatchNorm across devices."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from jaxvae import losses, models
from jaxvae.models import VAE, bottleneck_shape, count_params, make_log_likelihood_fn, mean_image

SEED_HIDDEN = (32, 64, 128, 256, 512)


def seed_torch_layers(hidden, latent, channels, b_hw):
    """The seed VanillaVAE's parametrised layers, read off its __init__, as
    (torch module name, kind, torch parameter shapes). ``b_hw``: encoder's final spatial shape
    (the seed hard-codes 2x2, i.e. "hidden_dims[-1] * 4")."""
    flat = hidden[-1] * b_hw[0] * b_hw[1]
    layers, cin = [], channels
    for i, h in enumerate(hidden):
        layers.append((f"encoder.{i}.0", "conv", {"weight": (h, cin, 3, 3), "bias": (h,)}))
        layers.append((f"encoder.{i}.1", "bn", {"weight": (h,), "bias": (h,)}))
        cin = h
    for name in ("fc_mu", "fc_var"):
        layers.append((name, "linear", {"weight": (latent, flat), "bias": (latent,)}))
    layers.append(("decoder_input", "linear", {"weight": (flat, latent), "bias": (flat,)}))
    rev = hidden[::-1]
    for i in range(len(rev) - 1):
        w = (rev[i], rev[i + 1], 3, 3)  # ConvTranspose2d: [in, out, kh, kw]
        layers.append((f"decoder.{i}.0", "convT", {"weight": w, "bias": (rev[i + 1],)}))
        layers.append((f"decoder.{i}.1", "bn", {"weight": (rev[i + 1],), "bias": (rev[i + 1],)}))
    h0 = rev[-1]
    layers.append(("final_layer.0", "convT", {"weight": (h0, h0, 3, 3), "bias": (h0,)}))
    layers.append(("final_layer.1", "bn", {"weight": (h0,), "bias": (h0,)}))
    layers.append(("final_layer.3", "conv", {"weight": (channels, h0, 3, 3), "bias": (channels,)}))
    return layers


def flax_path(torch_name):
    """Our documented naming of each seed layer."""
    parts = torch_name.split(".")
    if parts[0] == "encoder":
        return ("encoder", ("conv_" if parts[2] == "0" else "bn_") + parts[1])
    if parts[0] in ("fc_mu", "fc_var"):
        return ("encoder", parts[0])
    if parts[0] == "decoder_input":
        return ("decoder", "decoder_input")
    if parts[0] == "decoder":
        return ("decoder", ("conv_transpose_" if parts[2] == "0" else "bn_") + parts[1])
    return ("decoder", {"0": "final_conv_transpose", "1": "final_bn", "3": "final_conv"}[parts[1]])


def expected_flax_shapes(kind, torch_shapes):
    """PyTorch -> Flax layouts: conv OIHW -> HWIO; convT [I,O,h,w] -> [h,w,O,I]; linear W^T."""
    w = torch_shapes["weight"]
    if kind in ("conv", "convT"):
        return {"kernel": (w[2], w[3], w[1], w[0]), "bias": torch_shapes["bias"]}
    if kind == "linear":
        return {"kernel": (w[1], w[0]), "bias": torch_shapes["bias"]}
    return {"scale": w, "bias": torch_shapes["bias"]}


def abstract_init(model, batch=2):
    x = jax.ShapeDtypeStruct((batch, *model.image_shape), jnp.float32)
    key = jax.random.key(0)
    return jax.eval_shape(lambda x: model.init({"params": key}, x, key, train=False), x)


def shapes_of(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize(
    "image_shape,likelihood,latent",
    [
        ((64, 64, 3), "gaussian", 128),  # the seed (and CelebA 64x64)
        ((28, 28, 1), "bernoulli", 16),  # MNIST
        ((32, 32, 3), "gaussian", 64),  # CIFAR-10
    ],
)
def test_every_layer_has_the_seed_architecture_shape(image_shape, likelihood, latent):
    model = VAE(latent_dim=latent, image_shape=image_shape, likelihood=likelihood)
    variables = abstract_init(model)
    b_hw = bottleneck_shape(image_shape[:2], 5)
    layers = seed_torch_layers(SEED_HIDDEN, latent, image_shape[2], b_hw)

    want_params: dict = {"encoder": {}, "decoder": {}}
    want_stats: dict = {"encoder": {}, "decoder": {}}
    for name, kind, torch_shapes in layers:
        part, leaf = flax_path(name)
        want_params[part][leaf] = expected_flax_shapes(kind, torch_shapes)
        if kind == "bn":
            c = torch_shapes["weight"]
            want_stats[part][leaf] = {"mean": c, "var": c}
    assert shapes_of(variables["params"]) == want_params
    assert shapes_of(variables["batch_stats"]) == want_stats

    torch_count = sum(math.prod(s) for _, _, shapes in layers for s in shapes.values())
    assert count_params(variables["params"]) == torch_count
    if image_shape == (64, 64, 3):
        assert b_hw == (2, 2)  # the seed's hard-coded view(-1, 512, 2, 2)
        assert torch_count == 3_937_635  # VanillaVAE's trainable parameters (issue 3)


@pytest.mark.parametrize(
    "image_shape,bottleneck",
    [((64, 64, 3), (2, 2)), ((28, 28, 1), (1, 1)), ((32, 32, 3), (1, 1)), ((30, 17, 2), (1, 1))],
)
def test_default_model_output_shapes_equal_input_shapes(image_shape, bottleneck):
    model = VAE(latent_dim=8, image_shape=image_shape)
    assert bottleneck_shape(image_shape[:2], 5) == bottleneck
    variables = abstract_init(model, batch=3)
    x = jax.ShapeDtypeStruct((3, *image_shape), jnp.float32)
    outputs, mean, logvar = jax.eval_shape(
        lambda v, x: model.apply(v, x, jax.random.key(0), train=False), variables, x
    )
    assert outputs.shape == (3, *image_shape) and outputs.dtype == jnp.float32
    assert mean.shape == logvar.shape == (3, 8)


_JIT_CACHE: dict = {}


def japply(model, variables, *args, **static):
    """``model.apply`` jitted (one compile instead of many eager op compiles, reused across calls
    with the same model and keyword arguments, which are static)."""
    key = (repr(model), repr(sorted(static.items())))
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(lambda v, *a: model.apply(v, *a, **static))
    return _JIT_CACHE[key](variables, *args)


def small_model(**kw):
    """A tiny model. The strided convs use the plain "xla" formulation (fewer ops, faster to
    compile); the default "auto" is exercised by the 28x28, multi-device and parity tests."""
    kw = {
        "latent_dim": 3,
        "hidden_dims": (4, 8, 8),
        "image_shape": (28, 28, 1),
        "conv_impl": "xla",
        **kw,
    }
    return VAE(**kw)


_INIT_CACHE: dict = {}


def init(model):
    """Variables of ``model``, cached per architecture. The key is an "rbg" key: compiling the
    threefry PRNG of ~50 parameter initialisers took ~15-20 s on the (loaded) 2-core dev machine,
    rbg ~3 s."""
    arch = (model.latent_dim, tuple(model.hidden_dims), tuple(model.image_shape))
    if arch not in _INIT_CACHE:
        x = jnp.zeros((1, *model.image_shape))
        key = jax.random.key(0, impl="rbg")
        _INIT_CACHE[arch] = jax.jit(lambda k: model.init({"params": k}, x, k, train=False))(key)
    return _INIT_CACHE[arch]


def test_initialisation_is_pytorch_default():
    """Weights and biases U(+-1/sqrt(fan_in)) with PyTorch's fan_in (a ConvTranspose2d's is its
    out_channels * 9); BatchNorm scale 1, bias 0."""
    params = init(small_model())["params"]  # 28x28x1, hidden (4, 8, 8) -> 4x4x8 bottleneck
    fan_in = {
        ("encoder", "conv_0"): 1 * 9,
        ("encoder", "conv_1"): 4 * 9,
        ("encoder", "conv_2"): 8 * 9,
        ("encoder", "fc_mu"): 4 * 4 * 8,
        ("encoder", "fc_var"): 4 * 4 * 8,
        ("decoder", "decoder_input"): 3,
        ("decoder", "conv_transpose_0"): 8 * 9,
        ("decoder", "conv_transpose_1"): 4 * 9,
        ("decoder", "final_conv_transpose"): 4 * 9,
        ("decoder", "final_conv"): 4 * 9,
    }
    for (part, name), n in fan_in.items():
        bound = 1 / math.sqrt(n)
        kernel, bias = params[part][name]["kernel"], params[part][name]["bias"]
        assert float(jnp.abs(kernel).max()) <= bound and float(jnp.abs(bias).max()) <= bound
        if kernel.size >= 250:  # std of U(-b, b) is b / sqrt(3)
            assert abs(float(kernel.std()) * math.sqrt(3) / bound - 1) < 0.15, (name, kernel.std())
    for part in ("encoder", "decoder"):
        for name, leaf in params[part].items():
            if "bn" in name:
                np.testing.assert_array_equal(leaf["scale"], 1.0)
                np.testing.assert_array_equal(leaf["bias"], 0.0)


def test_non_divisible_28x28_runs_in_train_and_eval_and_keeps_the_shape():
    # 28 -> 14 -> 7 -> 4 -> 8 -> 16 -> 32 -> crop 28
    model = small_model(likelihood="bernoulli", conv_impl="auto")
    v = init(model)
    x = jax.random.bernoulli(jax.random.key(2), 0.3, (5, 28, 28, 1)).astype(jnp.float32)
    (out, mean, logvar), updates = japply(
        model, v, x, jax.random.key(3), train=True, mutable=["batch_stats"]
    )
    assert out.shape == x.shape and mean.shape == (5, 3)
    assert np.isfinite(np.asarray(out)).all()
    # Train mode updated every BatchNorm's running statistics.
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], updates["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))
    out_eval, _, _ = japply(model, v, x, jax.random.key(3), train=False)
    assert out_eval.shape == x.shape
    ll = make_log_likelihood_fn("bernoulli")(x, out_eval)
    assert ll.shape == (5,)


def test_non_divisible_sizes_are_aligned_top_left_with_the_surplus_at_bottom_right():
    """A 7x7 model and an 8x8 model share parameters (both have a 4x4 bottleneck with one level).

    Encoder: the 7x7 image is encoded exactly like the 8x8 image made by zero-padding it at the
    bottom/right. Decoder: the 7x7 outputs are the top-left of the 8x8 decoding (rows/columns
    0..5 exactly; the last ones differ because the output conv zero-pads at the true border of
    the cropped map, as PyTorch does at an image border)."""
    small = VAE(
        latent_dim=2,
        hidden_dims=(4,),
        image_shape=(7, 7, 1),
        output_activation="none",
        conv_impl="xla",
    )
    big = small.clone(image_shape=(8, 8, 1))
    assert bottleneck_shape((7, 7), 1) == bottleneck_shape((8, 8), 1) == (4, 4)
    v = init(small)
    assert shapes_of(v) == shapes_of(abstract_init(big))

    x7 = jax.random.normal(jax.random.key(5), (3, 7, 7, 1))
    x8 = jnp.pad(x7, ((0, 0), (0, 1), (0, 1), (0, 0)))
    # Train mode: identical feature maps, hence identical BatchNorm batch statistics too.
    (m7, _), stats7 = japply(small, v, x7, train=True, method="encode", mutable=["batch_stats"])
    (m8, _), stats8 = japply(big, v, x8, train=True, method="encode", mutable=["batch_stats"])
    np.testing.assert_allclose(m7, m8, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), stats7, stats8)

    z = jax.random.normal(jax.random.key(4), (3, 2))
    out_small = japply(small, v, z, method="decode")
    out_big = japply(big, v, z, method="decode")
    assert out_small.shape == (3, 7, 7, 1)
    np.testing.assert_allclose(out_small[:, :6, :6], out_big[:, :6, :6], atol=1e-6)
    assert np.abs(out_small[:, 6] - out_big[:, 6, :7]).max() > 1e-4


def test_bad_image_shape_raises_naming_both_shapes():
    model = small_model()
    v = init(model)
    with pytest.raises(ValueError, match=r"\(28, 28, 1\).*\(2, 32, 32, 1\)"):
        model.apply(v, jnp.zeros((2, 32, 32, 1)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\].*\(2, 4\)"):
        model.apply(v, jnp.zeros((2, 4)), method="decode")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"likelihood": "laplace"}, "likelihood"),
        ({"output_activation": "sigmoid"}, "output_activation"),
        ({"hidden_dims": ()}, "hidden_dims"),
        ({"image_shape": (28, 28)}, "image_shape"),
    ],
)
def test_bad_fields_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        small_model(**kw)


def test_call_is_encode_reparameterize_decode_with_the_explicit_key():
    model = small_model(image_shape=(8, 8, 1))
    v = init(model)
    x = jax.random.normal(jax.random.key(6), (4, 8, 8, 1))
    key = jax.random.key(7)
    out, mean, logvar = japply(model, v, x, key, train=False)
    m2, lv2 = japply(model, v, x, method="encode")
    z = losses.reparameterize(key, m2, lv2)
    np.testing.assert_allclose(out, japply(model, v, z, method="decode"), atol=1e-6)
    np.testing.assert_allclose(mean, m2, atol=1e-6)
    # A different key gives different outputs; the same key the same ones.
    out_other, _, _ = japply(model, v, x, jax.random.key(8), train=False)
    assert np.abs(out - out_other).max() > 1e-4
    np.testing.assert_array_equal(out, japply(model, v, x, key, train=False)[0])


def test_decode_accepts_leading_dims_and_encode_too():
    model = small_model(image_shape=(8, 8, 1))
    v = init(model)
    z = jax.random.normal(jax.random.key(9), (5, 2, 3))
    out = japply(model, v, z, method="decode")
    assert out.shape == (5, 2, 8, 8, 1)
    np.testing.assert_allclose(
        out.reshape(10, 8, 8, 1), japply(model, v, z.reshape(10, 3), method="decode"), atol=1e-6
    )
    x = jax.random.normal(jax.random.key(10), (5, 2, 8, 8, 1))
    mean, logvar = japply(model, v, x, method="encode")
    assert mean.shape == logvar.shape == (5, 2, 3)


def test_output_activation_and_bernoulli_logits_share_the_same_pre_activation():
    tanh_model = small_model(image_shape=(8, 8, 1), likelihood="gaussian", output_activation="tanh")
    none_model = tanh_model.clone(output_activation="none")
    bern_model = tanh_model.clone(likelihood="bernoulli")  # output_activation ignored: logits
    v = init(tanh_model)
    z = 3.0 * jax.random.normal(jax.random.key(11), (4, 3))
    pre = japply(none_model, v, z, method="decode")
    np.testing.assert_allclose(japply(tanh_model, v, z, method="decode"), jnp.tanh(pre), atol=1e-6)
    np.testing.assert_allclose(japply(bern_model, v, z, method="decode"), pre, atol=1e-6)


def test_sample_and_reconstruct_are_mean_images_in_eval_mode():
    model = small_model(image_shape=(8, 8, 1), likelihood="bernoulli")
    v = init(model)
    key = jax.random.key(12)
    samples = japply(model, v, key, num_samples=6, method="sample")
    z = jax.random.normal(key, (6, 3))
    np.testing.assert_allclose(
        samples, jax.nn.sigmoid(japply(model, v, z, method="decode")), atol=1e-6
    )
    assert samples.shape == (6, 8, 8, 1) and (samples > 0).all() and (samples < 1).all()
    x = jax.random.normal(jax.random.key(13), (2, 8, 8, 1))
    mean, _ = japply(model, v, x, method="encode")
    np.testing.assert_allclose(
        japply(model, v, x, method="reconstruct"),
        mean_image("bernoulli", japply(model, v, mean, method="decode")),
        atol=1e-6,
    )
    gauss = model.clone(likelihood="gaussian")
    np.testing.assert_allclose(
        japply(gauss, v, key, num_samples=6, method="sample"),
        japply(gauss, v, z, method="decode"),
        atol=1e-6,
    )


def test_log_likelihood_fns_match_scipy():
    rng = np.random.default_rng(0)
    x_bin = (rng.random((3, 4, 4, 2)) < 0.4).astype(np.float32)
    x_real = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    outputs = rng.normal(size=(5, 3, 4, 4, 2)).astype(np.float32)  # [S, B, H, W, C]

    ll = make_log_likelihood_fn("bernoulli")(x_bin, outputs)
    p = 1 / (1 + np.exp(-outputs.astype(np.float64)))
    want = stats.bernoulli.logpmf(np.broadcast_to(x_bin, p.shape), p).sum(axis=(-3, -2, -1))
    assert ll.shape == (5, 3)
    np.testing.assert_allclose(ll, want, rtol=1e-5)

    obs_logvar = -1.3
    ll = make_log_likelihood_fn("gaussian", obs_logvar)(x_real, outputs)
    want = stats.norm.logpdf(x_real, outputs, math.exp(0.5 * obs_logvar)).sum(axis=(-3, -2, -1))
    np.testing.assert_allclose(ll, want, rtol=1e-5)

    np.testing.assert_allclose(mean_image("bernoulli", outputs), p, rtol=1e-5)
    np.testing.assert_array_equal(mean_image("gaussian", outputs), outputs)
    with pytest.raises(ValueError, match="likelihood"):
        make_log_likelihood_fn("poisson")


def test_bfloat16_compute_returns_float32_close_to_float32_model():
    model = small_model(image_shape=(8, 8, 1))
    v = init(model)
    x = jax.random.normal(jax.random.key(14), (4, 8, 8, 1))
    ref = japply(model, v, x, jax.random.key(0))
    low = japply(model.clone(dtype=jnp.bfloat16), v, x, jax.random.key(0))
    for a, b in zip(ref, low, strict=True):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=0.1)
    assert jax.tree.map(lambda a: a.dtype, v["params"]) == jax.tree.map(
        lambda a: jnp.dtype(jnp.float32), v["params"]
    )


def test_bfloat16_model_has_the_float32_variables_and_float32_batchnorm_statistics():
    """A bfloat16 model initialises the very same float32 variables (so checkpoints do not
    depend on the compute dtype); in training its BatchNorm statistics stay float32 and match
    the float32 model's on the same input to within the bfloat16 rounding of the activations."""
    model = small_model(image_shape=(8, 8, 1), conv_impl="gemm")
    low = model.clone(dtype=jnp.bfloat16)
    v = init(model)
    x = jnp.zeros((1, 8, 8, 1))
    key = jax.random.key(0, impl="rbg")
    v_low = jax.jit(lambda k: low.init({"params": k}, x, k, train=False))(key)
    jax.tree.map(np.testing.assert_array_equal, v_low, v)

    x = jax.random.normal(jax.random.key(15), (16, 8, 8, 1))
    stats = {}
    for m in (model, low):
        _, upd = japply(m, v, x, jax.random.key(0), train=True, mutable=["batch_stats"])
        stats[m.dtype] = upd["batch_stats"]
        assert {a.dtype for a in jax.tree.leaves(upd["batch_stats"])} == {jnp.dtype(jnp.float32)}
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-3),
        stats[jnp.bfloat16],
        stats[jnp.float32],
    )


def test_batchnorm_in_bfloat16_reduces_its_statistics_in_float32():
    """The model's BatchNorm on a bfloat16 input: bfloat16 output, float32 running statistics
    that hold the input's mean and variance to float32 precision (computed from the exact
    bfloat16 values in float64 here). Statistics reduced in bfloat16 would carry its 3
    significant digits (a relative error up to 2^-9 = 2e-3) and fail the 1e-5 bound."""
    rng = np.random.default_rng(16)
    # Mean far from 0 and 4096 values per channel: a bfloat16 sum would be far off.
    h = jnp.asarray(3.0 + rng.normal(size=(16, 16, 16, 4)), jnp.bfloat16)
    bn = models._batch_norm(train=True, dtype=jnp.bfloat16, name="bn")
    variables = bn.init(jax.random.key(0), h)
    y, upd = jax.jit(lambda v, h: bn.apply(v, h, mutable=["batch_stats"]))(variables, h)
    assert y.dtype == jnp.bfloat16
    stats = upd["batch_stats"]
    assert {a.dtype for a in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}
    exact = np.asarray(h, np.float64)
    mean, var = exact.mean(axis=(0, 1, 2)), exact.var(axis=(0, 1, 2))
    # Running statistics: 0.9 * initial (mean 0, variance 1) + 0.1 * the batch's.
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-6)
    # The normalised output: (h - mean) / sqrt(var + eps), rounded to bfloat16 once.
    want = (exact - mean) / np.sqrt(var + models.BN_EPSILON)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2**-8, atol=2**-8)


# ---------------------------------------------------------------------------
# BatchNorm across devices
# ---------------------------------------------------------------------------


def _local_loss(model, params, batch_stats, x, eps):
    """Mean over the batch of a VAE negative ELBO with fixed noise ``eps``; BatchNorm in
    train mode. Returns (loss, new batch_stats)."""

    def forward(m, x, eps):
        mean, logvar = m.encode(x, train=True)
        outputs = m.decode(mean + jnp.exp(0.5 * logvar) * eps, train=True)
        return outputs, mean, logvar

    (outputs, mean, logvar), updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        eps,
        method=forward,
        mutable=["batch_stats"],
    )
    nll = -make_log_likelihood_fn("gaussian")(x, outputs)
    return jnp.mean(nll + losses.gaussian_kl(mean, logvar)), updates["batch_stats"]


def test_batchnorm_under_jit_over_8_devices_uses_the_global_batch():
    """``jax.jit`` over a batch sharded on 8 devices (how jaxvae.train_step runs): loss,
    gradients and BatchNorm running statistics equal those of the same batch on one device,
    so BatchNorm normalises with the global batch's statistics without any ``axis_name``.
    Negative control: per-device statistics (each device's 2 examples normalised alone,
    emulated with vmap over the 8 shards) give visibly different gradients and statistics."""
    n_dev = 8
    assert jax.device_count() >= n_dev
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    model = small_model(image_shape=(8, 8, 1), conv_impl="auto")
    v = init(model)
    # Non-trivial running statistics, so their update is checked too.
    v = {
        "params": v["params"],
        "batch_stats": jax.tree.map(lambda a: a + 0.5, v["batch_stats"]),
    }
    x = jax.random.normal(jax.random.key(20), (2 * n_dev, 8, 8, 1))
    x = x * jnp.arange(1, 2 * n_dev + 1).reshape(-1, 1, 1, 1) / n_dev  # uneven per-device stats
    eps = jax.random.normal(jax.random.key(21), (2 * n_dev, 3))

    def step(params, bs, x, eps):
        return jax.value_and_grad(lambda p: _local_loss(model, p, bs, x, eps), has_aux=True)(params)

    (loss1, stats1), grads1 = jax.jit(step)(v["params"], v["batch_stats"], x, eps)
    rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sharded = jax.jit(step, in_shardings=(whole, whole, rows, rows), out_shardings=whole)
    (loss8, stats8), grads8 = sharded(v["params"], v["batch_stats"], x, eps)
    assert len(x.sharding.device_set) == 1  # the reference really ran on one device

    # Gradients agree to 1e-5 relative to the largest gradient (the conv biases feeding a
    # BatchNorm have exactly-zero true gradients, so their float error has no scale of its own).
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads1))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)
    for a, b in zip(jax.tree.leaves(stats8), jax.tree.leaves(stats1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # Negative control: each shard of 2 examples normalised with its own statistics.
    shards = lambda a: a.reshape(n_dev, 2, *a.shape[1:])  # noqa: E731
    per_shard = jax.jit(jax.vmap(step, in_axes=(None, None, 0, 0)))(
        v["params"], v["batch_stats"], shards(x), shards(eps)
    )
    (_, stats_u), grads_u = jax.tree.map(lambda a: jnp.mean(a, axis=0), per_shard)
    grad_gap = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(grads_u), jax.tree.leaves(grads1), strict=True)
    )
    assert grad_gap > 1e-3 * scale
    var_gap = jnp.abs(stats_u["encoder"]["bn_0"]["var"] - stats1["encoder"]["bn_0"]["var"])
    assert float(var_gap.max()) > 1e-3


def test_decoder_options_keep_the_encoder_and_the_default_parity():
    """decoder_type / decoder_hidden_dims change the decoder only; the defaults are
    VanillaVAE's tree (the seed's 3,937,635 parameters are checked above)."""
    x = jnp.zeros((3, 28, 28, 1))
    key = jax.random.key(0)
    common = dict(
        latent_dim=50,
        hidden_dims=(32, 64, 128),
        image_shape=(28, 28, 1),
        likelihood="bernoulli",
        output_activation="none",
    )
    base = models.VAE(**common)
    mirrored = models.VAE(**common, decoder_hidden_dims=(32, 64, 128))
    narrow = models.VAE(**common, decoder_hidden_dims=(8, 16))
    mlp = models.VAE(**common, decoder_type="mlp", decoder_hidden_dims=(512, 256))
    shapes = {}
    # Shapes only: jax.eval_shape traces init and apply without computing them.
    for name, m in [("base", base), ("mirrored", mirrored), ("narrow", narrow), ("mlp", mlp)]:
        v = jax.eval_shape(m.init, key, x, key)
        shapes[name] = jax.tree.map(lambda a: a.shape, v["params"])
        out, mean, _ = jax.eval_shape(m.apply, v, x, key)
        assert out.shape == x.shape and mean.shape == (3, 50)
    assert shapes["mirrored"] == shapes["base"]
    for name in ("narrow", "mlp"):
        assert shapes[name]["encoder"] == shapes["base"]["encoder"]
    assert shapes["narrow"]["decoder"]["decoder_input"]["kernel"] == (50, 7 * 7 * 16)
    assert shapes["mlp"]["decoder"] == {
        "dense_0": {"kernel": (50, 512), "bias": (512,)},
        "dense_1": {"kernel": (512, 256), "bias": (256,)},
        "output": {"kernel": (256, 784), "bias": (784,)},
    }
    # The MLP decoder computes leaky_relu layers then a dense output, reshaped to the image.
    v = jax.jit(mlp.init)(key, x, key)
    z = jax.random.normal(key, (2, 50))
    p = v["params"]["decoder"]
    h = jax.nn.leaky_relu(z @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0.01)
    h = jax.nn.leaky_relu(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"], 0.01)
    want = (h @ p["output"]["kernel"] + p["output"]["bias"]).reshape(2, 28, 28, 1)
    np.testing.assert_allclose(mlp.apply(v, z, method="decode"), want, rtol=1e-5, atol=1e-5)
    seed_x = jnp.zeros((1, 64, 64, 3))
    with pytest.raises(ValueError, match="needs decoder_hidden_dims"):
        jax.eval_shape(models.VAE(latent_dim=2, decoder_type="mlp").init, key, seed_x, key)
    with pytest.raises(ValueError, match="decoder_type must be one of"):
        jax.eval_shape(models.VAE(latent_dim=2, decoder_type="resnet").init, key, seed_x, key)
