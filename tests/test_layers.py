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

from jaxvae import layers

IMPLS = ("xla", "subpixel", "gemm")
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
    for impl in ("subpixel", "gemm"):
        y, (dv, dx) = run(impl)
        _close(y, y_ref, f"{impl} output")
        _close(dx, dx_ref, f"{impl} d/dx")
        for name in ("kernel", "bias"):
            _close(dv["params"][name], dv_ref["params"][name], f"{impl} d/d{name}")


def test_auto_picks_per_backend_and_bad_values_raise():
    expected = "gemm" if jax.default_backend() == "cpu" else "xla"
    assert layers.resolve_impl("auto") == expected
    assert layers.resolve_impl("subpixel") == "subpixel"
    with pytest.raises(ValueError, match="Unknown conv impl 'fast'"):
        layers.resolve_impl("fast")
    x = jnp.zeros((1, 4, 4, 3))
    variables = jax.jit(layers.Conv3x3Stride2(2).init)(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(1, 4, 4, 5\)"):
        layers.Conv3x3Stride2(2).apply(variables, jnp.zeros((1, 4, 4, 5)))
