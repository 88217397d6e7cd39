"""Strided convolution layers with PyTorch semantics.

The VanillaVAE of PyTorch-VAE downsamples with ``Conv2d(k=3, s=2, p=1)`` and
upsamples with ``ConvTranspose2d(k=3, s=2, p=1, output_padding=1)``. These two
modules compute exactly those functions on NHWC arrays, and own their
parameters directly so that a faster formulation can be swapped in without
changing the parameter tree:

- ``Conv3x3Stride2``: ``kernel [3, 3, C_in, C_out]``, ``bias [C_out]``
  (the layout of ``flax.linen.Conv``).
- ``ConvTranspose3x3Stride2``: ``kernel [3, 3, C_out, C_in]``, ``bias [C_out]``
  (the layout of ``flax.linen.ConvTranspose(transpose_kernel=True)``, i.e. the
  kernel of the forward convolution whose gradient this layer is).

Shapes: ``Conv3x3Stride2`` maps ``[N, H, W, C_in] -> [N, ceil(H/2), ceil(W/2), C_out]``;
``ConvTranspose3x3Stride2`` maps ``[N, H, W, C_in] -> [N, 2H, 2W, C_out]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


class Conv3x3Stride2(nn.Module):
    """PyTorch ``Conv2d(kernel_size=3, stride=2, padding=1)`` in NHWC."""

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        y = lax.conv_general_dilated(
            x, kernel.astype(x.dtype), (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN
        )
        return y + bias.astype(x.dtype)


class ConvTranspose3x3Stride2(nn.Module):
    """PyTorch ``ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)`` in NHWC."""

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (3, 3, self.features, x.shape[-1]))
        bias = self.param("bias", self.bias_init, (self.features,))
        # Transposed conv of a k3/s2/p1 conv with output_padding 1: pad k-1-p = 1
        # before and k-1-p+output_padding = 2 after the dilated input.
        y = lax.conv_transpose(
            x,
            kernel.astype(x.dtype),
            (2, 2),
            ((1, 2), (1, 2)),
            dimension_numbers=_DN,
            transpose_kernel=True,
        )
        return y + bias.astype(x.dtype)


__all__ = ["Conv3x3Stride2", "ConvTranspose3x3Stride2"]
