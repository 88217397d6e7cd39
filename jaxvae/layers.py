"""Convolution layers with PyTorch semantics, in interchangeable formulations.

The VanillaVAE of PyTorch-VAE downsamples with ``Conv2d(k=3, s=2, p=1)``, upsamples with
``ConvTranspose2d(k=3, s=2, p=1, output_padding=1)`` and ends with ``Conv2d(k=3, s=1, p=1)``.
These modules compute exactly those functions on NHWC arrays, and own their parameters
directly so that the formulation can be swapped without changing the parameter tree:

- ``Conv3x3Stride2``: ``kernel [3, 3, C_in, C_out]``, ``bias [C_out]``
  (the layout of ``flax.linen.Conv``).
- ``ConvTranspose3x3Stride2``: ``kernel [3, 3, C_out, C_in]``, ``bias [C_out]``
  (the layout of ``flax.linen.ConvTranspose(transpose_kernel=True)``, i.e. the
  kernel of the forward convolution whose gradient this layer is;
  ``kernel[a, b, o, i] == torch_weight[i, o, a, b]``).
- ``Conv3x3``: ``kernel [3, 3, C_in, C_out]``, ``bias [C_out]``: the tree of
  ``flax.linen.Conv(C_out, (3, 3), padding=1)``, which it can replace.

Shapes: ``Conv3x3Stride2`` maps ``[N, H, W, C_in] -> [N, ceil(H/2), ceil(W/2), C_out]``
(odd sides as torch: padding 1 on both sides, the last window may read the bottom pad);
``ConvTranspose3x3Stride2`` maps ``[N, H, W, C_in] -> [N, 2H, 2W, C_out]``; ``Conv3x3``
keeps ``H, W``.

Formulations (the ``impl`` field; every one computes the same function, tested to 1e-5
in outputs and gradients against a NumPy transcription of PyTorch's formulas):

- ``"xla"``: one ``lax`` convolution (stride 2; transposed: input dilation 2). On CPU the
  gradients are convolutions over zero-dilated arrays, and weight gradients are
  convolutions whose "kernel" is a whole activation: XLA's CPU backend runs both slowly.
- ``"gemm"``: no convolution op at all. im2col (9 strided slices) + one GEMM for the
  strided conv; one GEMM ``x @ kernel -> [.., 9 C_out]`` + col2im (phase sums) for the
  transposed conv; exactly 9 multiply-adds per output. The weight gradients are GEMMs
  whose contraction runs over the whole batch and image, which CPU matmul kernels do at
  near peak. im2col and col2im are written as gathers and are each other's custom VJP
  (see ``_taps``), so the backward pass has no scatter. ``Conv3x3`` uses the output-side
  GEMM when ``C_out < C_in`` (the VAE's 32 -> 3 last layer) and XLA's conv otherwise.
- ``"auto"`` (default): ``"gemm"`` when ``jax.default_backend() == "cpu"``, otherwise
  ``"xla"``. On CPU ``"gemm"`` is the faster of the two (``benchmarks/README.md`` has the
  measurements; a third formulation, space-to-depth with stride-1 convolutions, was measured
  there and dropped: it was slower than ``"gemm"`` and used by nothing). GPU/TPU: cuDNN and
  the TPU compiler implement strided and transposed convolutions natively, while im2col would
  multiply the activation memory traffic by 9, so the native op is kept there. The choice is
  made at trace time.

Rearranged kernels are built from the same ``kernel`` parameter inside the traced function
(reshapes, slices, pads, concatenations), so gradients flow to the same parameter tree.

Mixed precision: every layer computes in its input's dtype. For a bfloat16 input the float32
``kernel`` is cast to bfloat16, so the GEMMs / convolutions take bfloat16 operands and return
bfloat16; the tap sums of the ``gemm`` formulations (a convolution's accumulation, forward and
backward) are added in float32 and rounded once, and the bias is added in float32
(:func:`add_bias`), so that its gradient is reduced in float32. :class:`Dense` does the same
for fully connected layers. (Matmuls and convolutions with bfloat16 operands accumulate in
float32 on TPU, GPU and XLA's CPU backend alike and round their output once.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")
IMPLS = ("auto", "xla", "gemm")


def resolve_impl(impl: str) -> str:
    """Returns the concrete formulation for ``impl`` on the current default backend."""
    if impl not in IMPLS:
        raise ValueError(f"Unknown conv impl {impl!r}; expected one of {IMPLS}.")
    if impl == "auto":
        return "gemm" if jax.default_backend() == "cpu" else "xla"
    return impl


def _check_input(module: nn.Module, x: jax.Array, in_axis: int) -> None:
    """Clear errors for a non-NHWC input or one whose channels do not match the kernel."""
    name = type(module).__name__
    if x.ndim != 4:
        raise ValueError(f"{name} expects NHWC input [N, H, W, C], got shape {tuple(x.shape)}.")
    if module.has_variable("params", "kernel"):
        kernel_in = module.get_variable("params", "kernel").shape[in_axis]
        if x.shape[-1] != kernel_in:
            raise ValueError(
                f"{name} expects NHWC input [N, H, W, {kernel_in}] (its kernel's input "
                f"channels), got shape {tuple(x.shape)}."
            )


# ---------------------------------------------------------------------------
# Conv2d(k=3, s=2, p=1)
# ---------------------------------------------------------------------------


def conv3x3_stride2_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Plain strided convolution.

    x: [N, H, W, Ci], kernel: [3, 3, Ci, Co] -> [N, ceil(H/2), ceil(W/2), Co].
    """
    return lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN)


def _dot_channels(x: jax.Array, w: jax.Array) -> jax.Array:
    """[..., K] @ [K, M] -> [..., M] as one 2-D GEMM (so XLA's CPU backend calls its matmul)."""
    y = x.reshape(-1, x.shape[-1]) @ w
    return y.reshape(*x.shape[:-1], w.shape[-1])


def _taps_gather(u: jax.Array, ho: int, wo: int) -> jax.Array:
    """im2col of a k3/s2/p1 window: ``[N, H, W, C] -> [N, ho, wo, 9 C]``.

    ``out[i, j, (a, b, c)] = u[2i + a - 1, 2j + b - 1, c]`` (zero outside ``u``), tap-major
    like an ``HWIO`` kernel. A gather: every output element reads one input element.
    """
    n, h, w, c = u.shape
    # Window i reads padded rows 2i .. 2i+2, the last one 2 * ho (torch's bottom padding
    # when H is odd; beyond a longer u it is never read).
    up = jnp.pad(u, ((0, 0), (1, max(0, 2 * ho - h)), (1, max(0, 2 * wo - w)), (0, 0)))
    taps = [
        lax.slice(up, (0, a, b, 0), (n, a + 2 * ho - 1, b + 2 * wo - 1, c), (1, 2, 2, 1))
        for a in range(3)
        for b in range(3)
    ]
    return jnp.concatenate(taps, axis=-1)


def _accumulate(planes: list[jax.Array]) -> jax.Array:
    """Sum of same-shaped arrays, accumulated in at least float32, in their dtype.

    The tap sums of the GEMM formulations are the accumulation of a convolution: in bfloat16
    they are summed in float32 and rounded once, as a native convolution (or a TPU's MXU)
    accumulates. Elementwise, so XLA fuses the conversions; a no-op for float32.
    """
    dtype = planes[0].dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    total = planes[0].astype(acc)
    for p in planes[1:]:
        total = total + p.astype(acc)
    return total.astype(dtype)


# Output phase r of a transposed k3/s2/p1 conv (o = 2m + r) sums x[m + shift] * w[tap]
# over these (tap, shift) pairs: even outputs 2m take x[m] w[1]; odd outputs 2m + 1 take
# x[m] w[2] + x[m + 1] w[0].
_PHASE_TAPS = {0: ((1, 0),), 1: ((2, 0), (0, 1))}


def _untaps_gather(z: jax.Array) -> jax.Array:
    """col2im, the transpose of :func:`_taps_gather`: ``[N, h, w, 3, 3, C] -> [N, 2h, 2w, C]``.

    ``out[o] = sum_{i, a: o = 2i + a - 1} z[i, a]`` per spatial axis, computed as a gather:
    each of the four output phases is a sum of 1, 2, 2 or 4 shifted tap planes of ``z``,
    then the phases are interleaved.
    """
    n, h, w, _, _, c = z.shape

    def plane(a: int, dr: int, b: int, dc: int) -> jax.Array:
        # z[i + dr, j + dc, a, b], zero past the bottom/right edge. Padding each slice (not z)
        # lets XLA fuse it into the phase sums instead of materialising a padded copy of z.
        p = z[:, dr:, dc:, a, b, :]
        return jnp.pad(p, ((0, 0), (0, dr), (0, dc), (0, 0)))

    phase_rows = []
    for r in range(2):
        phase_cols = []
        for s in range(2):
            planes = [plane(a, dr, b, dc) for a, dr in _PHASE_TAPS[r] for b, dc in _PHASE_TAPS[s]]
            phase_cols.append(_accumulate(planes))
        phase_rows.append(jnp.stack(phase_cols, axis=3))  # [N, h, w, 2 (s), C]
    y = jnp.stack(phase_rows, axis=2)  # [N, h, 2 (r), w, 2 (s), C]
    return y.reshape(n, 2 * h, 2 * w, c)


# im2col and col2im are each other's transposes. Both are written as gathers (each output
# element reads its inputs), and each one's VJP is the other, so that the backward pass is
# a gather too. Autodiff's own transpose of the strided slices in _taps_gather would sum
# nine padded arrays, and XLA's CPU backend fuses the producer of the cotangent (the next
# layer's BatchNorm backward) into each of them: on the seed VAE that one fusion cost as
# much as all GEMMs of the last layer. Only data movement is customised; the GEMMs stay
# ordinary dots, so autodiff (and the cross-device sum of the kernel's gradient under a sharded
# batch) handles the kernel as usual.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _taps(u: jax.Array, out_hw: tuple[int, int], in_hw: tuple[int, int]) -> jax.Array:
    """:func:`_taps_gather` of ``u: [N, *in_hw, C]`` -> ``[N, *out_hw, 9 C]``."""
    del in_hw  # u's own shape; needed by the backward pass only
    return _taps_gather(u, *out_hw)


def _taps_fwd(u, out_hw, in_hw):
    return _taps(u, out_hw, in_hw), None


def _taps_bwd(out_hw, in_hw, _, g):
    n, c = g.shape[0], g.shape[-1] // 9
    du = _untaps(g.reshape(n, *out_hw, 3, 3, c))
    return (du[:, : in_hw[0], : in_hw[1], :],)


_taps.defvjp(_taps_fwd, _taps_bwd)


@jax.custom_vjp
def _untaps(z: jax.Array) -> jax.Array:
    """:func:`_untaps_gather`: ``[N, h, w, 3, 3, C] -> [N, 2h, 2w, C]``."""
    return _untaps_gather(z)


def _untaps_fwd(z):
    return _untaps(z), None


def _untaps_bwd(_, g):
    n, h2, w2, c = g.shape
    hw = (h2 // 2, w2 // 2)
    return (_taps(g, hw, (h2, w2)).reshape(n, *hw, 3, 3, c),)


_untaps.defvjp(_untaps_fwd, _untaps_bwd)


def conv3x3_stride2_gemm(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Same function as :func:`conv3x3_stride2_xla` as im2col + one GEMM.

    ``y = taps(x) @ kernel`` with ``taps(x): [N, Ho, Wo, 9 Ci]`` and the kernel reshaped to
    ``[9 Ci, Co]``: exactly 9 multiply-adds per output. The backward pass is two GEMMs,
    ``dkernel = taps(x)^T @ dy`` (the whole batch is the contraction) and
    ``dtaps = dy @ kernel^T``, and ``dx = untaps(dtaps)`` (col2im, a gather).
    """
    _, h, w, ci = x.shape
    patches = _taps(x, (-(-h // 2), -(-w // 2)), (h, w))
    return _dot_channels(patches, kernel.reshape(9 * ci, -1))


# ---------------------------------------------------------------------------
# ConvTranspose2d(k=3, s=2, p=1, output_padding=1)
# ---------------------------------------------------------------------------


def conv_transpose3x3_stride2_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Plain transposed convolution. x: [N, H, W, Ci], kernel: [3, 3, Co, Ci] -> [N, 2H, 2W, Co]."""
    # Transposed conv of a k3/s2/p1 conv with output_padding 1: pad k-1-p = 1
    # before and k-1-p+output_padding = 2 after the dilated input.
    return lax.conv_transpose(
        x, kernel, (2, 2), ((1, 2), (1, 2)), dimension_numbers=_DN, transpose_kernel=True
    )


def _convt_matrix(kernel: jax.Array) -> jax.Array:
    """[3, 3, Co, Ci] -> [Ci, 9 Co], columns tap-major (a, b, Co)."""
    ci = kernel.shape[3]
    return kernel.transpose(3, 0, 1, 2).reshape(ci, -1)


def conv_transpose3x3_stride2_gemm(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Same function as :func:`conv_transpose3x3_stride2_xla` as one GEMM + col2im.

    ``z = x @ kernel`` (``[N, H, W, Ci] @ [Ci, 3 * 3 * Co]``) gives every tap's contribution,
    then ``y = untaps(z)`` sums them into the output phases (exactly 9 multiply-adds per input
    pixel and output channel). The backward pass is ``dz = taps(dy)`` (im2col, a gather) and
    two GEMMs: ``dx = dz @ kernel^T`` and ``dkernel = x^T @ dz`` over the whole batch.
    """
    n, h, w, _ = x.shape
    co = kernel.shape[2]
    z = _dot_channels(x, _convt_matrix(kernel)).reshape(n, h, w, 3, 3, co)
    return _untaps(z)


# ---------------------------------------------------------------------------
# Conv2d(k=3, s=1, p=1)
# ---------------------------------------------------------------------------


def conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Plain 'same' convolution. x: [N, H, W, Ci], kernel: [3, 3, Ci, Co] -> [N, H, W, Co]."""
    return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)


def _tap_sum_gather(z: jax.Array) -> jax.Array:
    """``[N, H, W, 3, 3, C] -> [N, H, W, C]``: ``y[i, j] = sum_ab z[i + a - 1, j + b - 1, a, b]``.

    The output side of a 3x3 'same' convolution (zero outside the image).
    """
    n, h, w, _, _, c = z.shape
    zp = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
    planes = [zp[:, a : a + h, b : b + w, a, b, :] for a in range(3) for b in range(3)]
    return _accumulate(planes)


def _tap_spread_planar(g: jax.Array) -> jax.Array:
    """Transpose of :func:`_tap_sum_gather`: ``dz[i, j, a, b] = g[i - a + 1, j - b + 1]``.

    g: [N, H, W, C] -> [N, H, W, 3, 3, C]. For ``C > 1`` gathered channel-major
    (``[C, N, H, W]`` planes, so every shifted copy moves whole image rows) and transposed once
    at the end, because gathering an RGB output's gradient in NHWC moves 3-float pieces. For
    ``C == 1`` (MNIST) the gather stays in NHWC, where the final transpose costs more than it
    saves (``benchmarks/README.md``).
    """
    n, h, w, c = g.shape
    if c == 1:
        gp = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
        planes = [gp[:, 2 - a : 2 - a + h, 2 - b : 2 - b + w] for a in range(3) for b in range(3)]
        return jnp.stack(planes, axis=3).reshape(n, h, w, 3, 3, c)
    gp = jnp.pad(g.transpose(3, 0, 1, 2), ((0, 0), (0, 0), (1, 1), (1, 1)))  # [C, N, H+2, W+2]
    planes = [gp[:, :, 2 - a : 2 - a + h, 2 - b : 2 - b + w] for a in range(3) for b in range(3)]
    return jnp.stack(planes).reshape(3, 3, c, n, h, w).transpose(3, 4, 5, 0, 1, 2)


@jax.custom_vjp
def _tap_sum(z: jax.Array) -> jax.Array:
    """:func:`_tap_sum_gather` with :func:`_tap_spread_planar` as its VJP (data movement only)."""
    return _tap_sum_gather(z)


_tap_sum.defvjp(lambda z: (_tap_sum_gather(z), None), lambda _, g: (_tap_spread_planar(g),))


def conv3x3_gemm(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Same function as :func:`conv3x3_xla`; one GEMM when ``Co < Ci``, else :func:`conv3x3_xla`.

    For few output channels (the VAE's last layer, 32 -> 3 or 1) the taps are summed on the
    output side: ``z = x @ kernel`` (``[..., Ci] @ [Ci, 9 Co]``), then
    ``y[i, j] = sum_ab z[i + a - 1, j + b - 1, a, b]``. Every large operand of the forward and
    backward GEMMs is then ``9 Co`` wide, and the kernel gradient ``x^T @ dz`` is a GEMM over
    the whole batch (XLA's CPU backend computes that gradient as a slow convolution).
    """
    n, h, w, ci = x.shape
    co = kernel.shape[-1]
    if co >= ci:
        return conv3x3_xla(x, kernel)
    z = _dot_channels(x, kernel.transpose(2, 0, 1, 3).reshape(ci, 9 * co))
    return _tap_sum(z.reshape(n, h, w, 3, 3, co))


_CONV_S1 = {"xla": conv3x3_xla, "gemm": conv3x3_gemm}
_CONV = {
    "xla": conv3x3_stride2_xla,
    "gemm": conv3x3_stride2_gemm,
}
_CONV_T = {
    "xla": conv_transpose3x3_stride2_xla,
    "gemm": conv_transpose3x3_stride2_gemm,
}


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` in at least float32, returned in ``y``'s dtype.

    For a bfloat16 ``y`` the float32 bias is not rounded to bfloat16 first, and, what matters
    more, the bias gradient (the sum of the output's cotangent over every batch row and pixel)
    is then reduced in float32: XLA reduces a bfloat16 array in bfloat16, rounding after every
    addition (on CPU too), which loses the gradient of a bias summed over 10^5 outputs. The
    add fuses with its producer; for float32 it is the plain ``y + bias``.
    """
    acc = jnp.promote_types(y.dtype, jnp.float32)
    return (y.astype(acc) + bias.astype(acc)).astype(y.dtype)


class Dense(nn.Module):
    """``flax.linen.Dense`` (same parameter tree: ``kernel [C_in, features]``, ``bias
    [features]``) computing ``x @ kernel`` in ``dtype``, with the bias added by
    :func:`add_bias` (in float32, so its gradient is reduced in float32). Returns ``dtype``.
    For ``dtype=float32`` it computes what ``nn.Dense`` computes.
    """

    features: int
    dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        y = lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ()))
        )
        return add_bias(y, bias)


class _Conv3x3Base(nn.Module):
    """Shared body of the three layers: own ``kernel``/``bias``, dispatch on ``impl``.

    Subclasses set ``_impls`` (formulation name -> ``fn(x, kernel)``) and ``_transposed``
    (kernel layout ``[3, 3, features, C_in]`` instead of ``[3, 3, C_in, features]``).
    """

    features: int
    impl: str = "auto"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    _impls: ClassVar[dict[str, Callable[[jax.Array, jax.Array], jax.Array]]] = {}
    _transposed: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fn = self._impls[resolve_impl(self.impl)]
        _check_input(self, x, in_axis=3 if self._transposed else 2)
        c_in = x.shape[-1]
        shape = (3, 3, self.features, c_in) if self._transposed else (3, 3, c_in, self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        bias = self.param("bias", self.bias_init, (self.features,))
        return add_bias(fn(x, kernel.astype(x.dtype)), bias)


class Conv3x3Stride2(_Conv3x3Base):
    """PyTorch ``Conv2d(kernel_size=3, stride=2, padding=1)`` in NHWC.

    x: [N, H, W, C_in] -> [N, ceil(H/2), ceil(W/2), features]. ``impl``: see the module
    docstring ("auto" | "xla" | "gemm"); every choice computes the same function.
    """

    _impls = _CONV


class Conv3x3(_Conv3x3Base):
    """PyTorch ``Conv2d(kernel_size=3, stride=1, padding=1)`` in NHWC.

    x: [N, H, W, C_in] -> [N, H, W, features]. The parameter tree of
    ``flax.linen.Conv(features, (3, 3), padding=1)`` (``kernel [3, 3, C_in, features]``,
    ``bias [features]``), so it replaces one without touching checkpoints. ``impl``: "xla"
    (one ``lax`` convolution) or "gemm" (:func:`conv3x3_gemm`); "auto" as for the strided
    layers.
    """

    _impls = _CONV_S1


class ConvTranspose3x3Stride2(_Conv3x3Base):
    """PyTorch ``ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)`` in NHWC.

    x: [N, H, W, C_in] -> [N, 2H, 2W, features]. ``impl``: see the module docstring
    ("auto" | "xla" | "gemm"); every choice computes the same function.
    """

    _impls = _CONV_T
    _transposed = True


__all__ = [
    "IMPLS",
    "Conv3x3",
    "Dense",
    "add_bias",
    "conv3x3_gemm",
    "conv3x3_xla",
    "Conv3x3Stride2",
    "ConvTranspose3x3Stride2",
    "conv3x3_stride2_gemm",
    "conv3x3_stride2_xla",
    "conv_transpose3x3_stride2_gemm",
    "conv_transpose3x3_stride2_xla",
    "resolve_impl",
]
