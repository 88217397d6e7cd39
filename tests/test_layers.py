"""The strided conv layers: every formulation equals PyTorch's formula and each other.

The reference is an independent float64 NumPy implementation of PyTorch's definitions,
written from the formulas (no torch at test time):

  Conv2d(k3, s2, p1):  y[i, j, o] = sum_{a, b, c} x[2i + a - 1, 2j + b - 1, c] w[o, c, a, b]
  ConvTranspose2d(k3, s2, p1, output_padding=1):
                       y[2i + a - 1, 2j + b - 1, o] += x[i, j, c] w[c, o, a, b]   (2H x 2W out)

with out-of-range input rows/columns reading zero. Gradients of the reference are the
transposed linear maps, also written directly; all formulations of ``jaxvae.layers`` must
match them (outputs and gradients w.r.t. input and kernel) to 1e-5.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import BF16, PRODUCTS, dtypes, equations, is_reduction

from jaxvae import layers

IMPLS = ("xla", "gemm")
# (N, H, W, C_in, C_out): even and odd sides, non-square, 1x1, several channel counts.
SHAPES = [
    (2, 8, 8, 3, 5),
    (1, 7, 7, 4, 6),
    (3, 5, 9, 2, 3),
    (2, 1, 1, 3, 2),
    (1, 6, 3, 16, 8),
    (4, 4, 4, 8, 1),
]


def np_conv_s2(x: np.ndarray, w_torch: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d(k3, s2, p1): x [N, H, W, C], w [O, C, 3, 3] -> [N, ceil(H/2), ceil(W/2), O]"""
    n, h, w, _ = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    y = np.zeros((n, ho, wo, w_torch.shape[0]))
    for i in range(ho):
        for j in range(wo):
            for a in range(3):
                for b in range(3):
                    r, c = 2 * i + a - 1, 2 * j + b - 1
                    if 0 <= r < h and 0 <= c < w:
                        y[:, i, j] += x[:, r, c] @ w_torch[:, :, a, b].T
    return y


def np_conv_s2_vjp(x, w_torch, g):
    """(dx, dw_torch) of <np_conv_s2(x, w), g>."""
    n, h, w, _ = x.shape
    dx, dw = np.zeros_like(x), np.zeros_like(w_torch)
    for i in range(g.shape[1]):
        for j in range(g.shape[2]):
            for a in range(3):
                for b in range(3):
                    r, c = 2 * i + a - 1, 2 * j + b - 1
                    if 0 <= r < h and 0 <= c < w:
                        dx[:, r, c] += g[:, i, j] @ w_torch[:, :, a, b]
                        dw[:, :, a, b] += g[:, i, j].T @ x[:, r, c]
    return dx, dw


def np_conv_t_s2(x: np.ndarray, w_torch: np.ndarray) -> np.ndarray:
    """PyTorch ConvTranspose2d(k3, s2, p1, op1): x [N, H, W, C], w [C, O, 3, 3] -> [N, 2H, 2W, O]"""
    n, h, w, _ = x.shape
    y = np.zeros((n, 2 * h, 2 * w, w_torch.shape[1]))
    for i in range(h):
        for j in range(w):
            for a in range(3):
                for b in range(3):
                    r, c = 2 * i + a - 1, 2 * j + b - 1
                    if 0 <= r < 2 * h and 0 <= c < 2 * w:
                        y[:, r, c] += x[:, i, j] @ w_torch[:, :, a, b]
    return y


def np_conv_t_s2_vjp(x, w_torch, g):
    """(dx, dw_torch) of <np_conv_t_s2(x, w), g>."""
    n, h, w, _ = x.shape
    dx, dw = np.zeros_like(x), np.zeros_like(w_torch)
    for i in range(h):
        for j in range(w):
            for a in range(3):
                for b in range(3):
                    r, c = 2 * i + a - 1, 2 * j + b - 1
                    if 0 <= r < 2 * h and 0 <= c < 2 * w:
                        dx[:, i, j] += g[:, r, c] @ w_torch[:, :, a, b].T
                        dw[:, :, a, b] += x[:, i, j].T @ g[:, r, c]
    return dx, dw


def np_conv_s1(x: np.ndarray, w_torch: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d(k3, s1, p1); x [N, H, W, C], w_torch [O, C, 3, 3] -> [N, H, W, O]."""
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((n, h, w, w_torch.shape[0]))
    for a in range(3):
        for b in range(3):
            y += xp[:, a : a + h, b : b + w] @ w_torch[:, :, a, b].T
    return y


def np_conv_s1_vjp(x, w_torch, g):
    """(dx, dw_torch) of <np_conv_s1(x, w), g>."""
    n, h, w, _ = x.shape
    dxp = np.zeros((n, h + 2, w + 2, x.shape[-1]))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dw = np.zeros_like(w_torch)
    for a in range(3):
        for b in range(3):
            dxp[:, a : a + h, b : b + w] += g @ w_torch[:, :, a, b]
            dw[:, :, a, b] = np.einsum("nhwo,nhwc->oc", g, xp[:, a : a + h, b : b + w])
    return dxp[:, 1:-1, 1:-1], dw


def _data(shape, transpose: bool, seed: int):
    n, h, w, ci, co = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, h, w, ci))
    # Kernels scaled like a real init so outputs are O(1) and 1e-5 is a float32-level tolerance.
    w_torch = rng.normal(size=(ci, co, 3, 3) if transpose else (co, ci, 3, 3)) / np.sqrt(9 * ci)
    out_hw = (2 * h, 2 * w) if transpose else ((h + 1) // 2, (w + 1) // 2)
    g = rng.normal(size=(n, *out_hw, co))
    return x, w_torch, g


def _value_and_grads(fn, x, kernel, g):
    def loss(x, kernel):
        return jnp.sum(fn(x, kernel) * g)

    y = jax.jit(fn)(x, kernel)
    dx, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
    return np.asarray(y), np.asarray(dx), np.asarray(dk)


def _close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conv_stride2_matches_torch_formula(impl, shape):
    x, w_torch, g = _data(shape, transpose=False, seed=0)
    y_ref = np_conv_s2(x, w_torch)
    dx_ref, dw_ref = np_conv_s2_vjp(x, w_torch, g)
    kernel = w_torch.transpose(2, 3, 1, 0)  # [O, C, a, b] -> HWIO [a, b, C, O]
    fn = getattr(layers, f"conv3x3_stride2_{impl}")
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    y, dx, dk = _value_and_grads(fn, f32(x), f32(kernel), f32(g))
    assert y.shape == y_ref.shape
    _close(y, y_ref, f"{impl} output")
    _close(dx, dx_ref, f"{impl} d/dx")
    _close(dk, dw_ref.transpose(2, 3, 1, 0), f"{impl} d/dkernel")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conv_transpose_stride2_matches_torch_formula(impl, shape):
    x, w_torch, g = _data(shape, transpose=True, seed=1)
    y_ref = np_conv_t_s2(x, w_torch)
    dx_ref, dw_ref = np_conv_t_s2_vjp(x, w_torch, g)
    # flax transpose_kernel layout: kernel[a, b, o, c] == torch weight[c, o, a, b].
    kernel = w_torch.transpose(2, 3, 1, 0)
    fn = getattr(layers, f"conv_transpose3x3_stride2_{impl}")
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    y, dx, dk = _value_and_grads(fn, f32(x), f32(kernel), f32(g))
    assert y.shape == y_ref.shape
    _close(y, y_ref, f"{impl} output")
    _close(dx, dx_ref, f"{impl} d/dx")
    _close(dk, dw_ref.transpose(2, 3, 1, 0), f"{impl} d/dkernel")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 8, 8, 32, 3), (1, 7, 5, 4, 1), (2, 5, 6, 3, 4)], ids=str)
def test_conv_stride1_matches_torch_formula(impl, shape):
    """Few output channels (the VAE's last layer) take the GEMM path, others XLA's conv."""
    x, w_torch, _ = _data(shape, transpose=False, seed=3)
    g = np.random.default_rng(4).normal(size=(*shape[:3], shape[4]))
    dx_ref, dw_ref = np_conv_s1_vjp(x, w_torch, g)
    fn = layers._CONV_S1[impl]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    y, dx, dk = _value_and_grads(fn, f32(x), f32(w_torch.transpose(2, 3, 1, 0)), f32(g))
    _close(y, np_conv_s1(x, w_torch), f"{impl} output")
    _close(dx, dx_ref, f"{impl} d/dx")
    _close(dk, dw_ref.transpose(2, 3, 1, 0), f"{impl} d/dkernel")


def test_conv3x3_is_a_drop_in_for_flax_conv():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 6, 5, 8)), jnp.float32)
    ref = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)))
    variables = jax.jit(ref.init)(jax.random.key(0), x)
    for impl in ("xla", "gemm"):
        m = layers.Conv3x3(3, impl=impl)
        shapes = jax.eval_shape(m.init, jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)
        _close(jax.jit(m.apply)(variables, x), ref.apply(variables, x), impl)


@pytest.mark.parametrize(
    "module", [layers.Conv3x3Stride2, layers.ConvTranspose3x3Stride2, layers.Conv3x3]
)
def test_modules_same_params_outputs_and_param_grads_for_every_impl(module):
    """One parameter tree serves every impl; outputs and gradients (kernel, bias, x) agree."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7, 6, 4)), jnp.float32)
    variables = jax.jit(module(5, impl="xla").init)(jax.random.key(1), x)
    # A non-zero bias so that its gradient path is exercised too.
    variables = flax.core.unfreeze(variables)
    variables["params"]["bias"] = jnp.arange(5.0) / 5
    out_shape = jax.eval_shape(module(5).apply, variables, x).shape
    g = jnp.asarray(np.random.default_rng(2).normal(size=out_shape), jnp.float32)

    def run(impl):
        m = module(5, impl=impl)
        shapes = jax.eval_shape(m.init, jax.random.key(1), x)
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)
        loss = lambda v, x: jnp.sum(m.apply(v, x) * g)
        return jax.jit(m.apply)(variables, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)

    y_ref, (dv_ref, dx_ref) = run("xla")
    for impl in ("gemm",):
        y, (dv, dx) = run(impl)
        _close(y, y_ref, f"{impl} output")
        _close(dx, dx_ref, f"{impl} d/dx")
        for name in ("kernel", "bias"):
            _close(dv["params"][name], dv_ref["params"][name], f"{impl} d/d{name}")


def test_auto_picks_per_backend_and_bad_values_raise():
    expected = "gemm" if jax.default_backend() == "cpu" else "xla"
    assert layers.resolve_impl("auto") == expected
    assert layers.resolve_impl("gemm") == "gemm"
    with pytest.raises(ValueError, match="Unknown conv impl 'fast'"):
        layers.resolve_impl("fast")
    x = jnp.zeros((1, 4, 4, 3))
    variables = jax.jit(layers.Conv3x3Stride2(2).init)(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(1, 4, 4, 5\)"):
        layers.Conv3x3Stride2(2).apply(variables, jnp.zeros((1, 4, 4, 5)))


def _program(fn, *args) -> str:
    """The traced program (jaxpr, sub-programs included) as text: equal text, same ops."""
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_is_the_native_convolution_on_accelerators(monkeypatch, backend):
    """No CPU-only formulation on a GPU/TPU: "auto" traces to exactly what "xla" traces to.

    ``jax.default_backend`` is replaced (the tests run on CPU); ``resolve_impl`` reads it at
    trace time, so every layer and the whole model see the accelerator.
    """
    from jaxvae.models import VAE

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert layers.resolve_impl("auto") == "xla"
    x = jnp.zeros((2, 8, 8, 3))
    for module in (layers.Conv3x3Stride2(4), layers.ConvTranspose3x3Stride2(4), layers.Conv3x3(2)):
        variables = module.init(jax.random.key(0), x)
        auto = _program(module.apply, variables, x)
        assert "conv_general_dilated" in auto
        assert auto == _program(module.clone(impl="xla").apply, variables, x)

    kwargs = dict(latent_dim=4, hidden_dims=(8, 16), image_shape=(8, 8, 3), likelihood="bernoulli")
    model = VAE(**kwargs)
    images = jnp.zeros((2, 8, 8, 3))
    variables = model.init({"params": jax.random.key(0)}, images, jax.random.key(1))
    apply = lambda m: lambda x, key: m.apply(variables, x, key, train=False)
    auto = _program(apply(model), images, jax.random.key(2))
    assert auto == _program(apply(VAE(**kwargs, conv_impl="xla")), images, jax.random.key(2))
    assert auto != _program(apply(VAE(**kwargs, conv_impl="gemm")), images, jax.random.key(2))


def test_auto_is_gemm_on_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert layers.resolve_impl("auto") == "gemm"
    x = jnp.zeros((2, 8, 8, 3))
    module = layers.Conv3x3Stride2(4)
    variables = module.init(jax.random.key(0), x)
    auto = _program(module.apply, variables, x)
    assert "conv_general_dilated" not in auto
    assert auto == _program(module.clone(impl="gemm").apply, variables, x)


# ---------------------------------------------------------------------------
# Mixed precision: a bfloat16 input computes in bfloat16, reduces in float32
# ---------------------------------------------------------------------------

_BF16_CASES = [
    (module, impl)
    for module in (layers.Conv3x3Stride2, layers.ConvTranspose3x3Stride2, layers.Conv3x3)
    for impl in IMPLS
] + [(layers.Dense, None)]


@pytest.mark.parametrize(("module", "impl"), _BF16_CASES, ids=lambda a: getattr(a, "__name__", a))
def test_bfloat16_input_computes_in_bfloat16_and_reduces_bias_gradient_in_float32(module, impl):
    """A bfloat16 input gives a bfloat16 output; every matmul/convolution of the forward and
    backward pass takes bfloat16 operands, none float32; no reduction takes a bfloat16 operand.
    The bias gradient, a sum over all 8 * 16 * 16 = 2048 outputs of a channel, is exact to
    float32 rounding: XLA reduces a bfloat16 array in bfloat16, and such a sum of values near 1
    stalls once it passes 256 (the bfloat16 spacing there is 2), so a bias added in bfloat16
    fails this by far. The float32 kernel and bias get float32 gradients."""
    rng = np.random.default_rng(7)
    x32 = jnp.asarray(rng.normal(size=(8, 16, 16, 16)), jnp.float32)
    # The convs compute in their input's dtype; Dense, like nn.Dense, in its ``dtype``.
    m = module(4, dtype=jnp.bfloat16) if impl is None else module(4, impl=impl)
    variables = jax.jit(m.init)(jax.random.key(0), x32)
    out_shape = jax.eval_shape(m.apply, variables, x32).shape
    g = jnp.asarray(1.0 + 0.01 * rng.normal(size=out_shape), jnp.float32)

    def loss(v, x):
        return jnp.sum(m.apply(v, x).astype(jnp.float32) * g)

    x16 = x32.astype(jnp.bfloat16)
    y16 = jax.jit(m.apply)(variables, x16)
    assert y16.dtype == BF16
    dv = jax.jit(jax.grad(loss))(variables, x16)["params"]
    assert {a.dtype for a in jax.tree.leaves(dv)} == {jnp.dtype(jnp.float32)}
    # The bias gradient is sum(g) over every output of its channel (g rounded to bfloat16 as
    # the cotangent of a bfloat16 output is).
    want = np.sum(np.asarray(g.astype(jnp.bfloat16), np.float64), axis=(0, 1, 2))
    np.testing.assert_allclose(dv["bias"], want, rtol=1e-5)
    # Output within bfloat16 rounding of the float32 layer's on the same (rounded) input.
    y32 = jax.jit(m.apply)(variables, x16.astype(jnp.float32))
    err = np.max(np.abs(np.asarray(y16, np.float32) - y32)) / np.max(np.abs(y32))
    assert err < 1e-2, err

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(variables, x16)
    products = [e for e in equations(jaxpr) if e.primitive.name in PRODUCTS]
    assert products and all(dtypes(e.invars) == {BF16} for e in products), [
        (e.primitive.name, dtypes(e.invars)) for e in products
    ]
    reductions = [e for e in equations(jaxpr) if is_reduction(e)]
    leaked = [(e.primitive.name, e.source_info) for e in reductions if BF16 in dtypes(e.invars)]
    assert reductions and not leaked, leaked


def test_dense_is_flax_dense_in_float32():
    """``layers.Dense`` has ``nn.Dense``'s parameter tree and initialisation, and computes the
    same function (outputs and gradients) in float32."""
    x = jnp.asarray(np.random.default_rng(8).normal(size=(5, 3, 12)), jnp.float32)
    init = dict(bias_init=nn.initializers.normal(1.0))  # a non-zero bias
    ref, m = nn.Dense(7, **init), layers.Dense(7, **init)
    variables = jax.jit(ref.init)(jax.random.key(2), x)
    jax.tree.map(np.testing.assert_array_equal, jax.jit(m.init)(jax.random.key(2), x), variables)

    def loss(module, v):
        return jnp.sum(jnp.sin(module.apply(v, x)))

    _close(m.apply(variables, x), ref.apply(variables, x), "Dense output")
    grads = [jax.grad(lambda v, mod=mod: loss(mod, v))(variables) for mod in (m, ref)]
    jax.tree.map(lambda a, b: _close(a, b, "Dense gradient"), *grads)
