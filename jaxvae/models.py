"""The convolutional VAE of PyTorch-VAE's ``VanillaVAE``, in Flax linen, for any image size.

Architecture (``L = len(hidden_dims)``, images NHWC ``[..., H, W, C]``):

- ``ConvEncoder``: ``L`` blocks ``Conv3x3Stride2(h) -> BatchNorm -> LeakyReLU(0.01)``, flatten,
  then two ``Dense(latent_dim)`` heads ``fc_mu`` and ``fc_var`` (the log-variance).
- ``ConvDecoder``: ``decoder_input = Dense(h_L * b_h * b_w)``, reshape to the encoder's final
  spatial shape ``[b_h, b_w, h_L]``, ``L - 1`` blocks ``ConvTranspose3x3Stride2 -> BatchNorm ->
  LeakyReLU`` over the reversed hidden dims, then the seed's final layer
  ``ConvTranspose3x3Stride2(h_1) -> BatchNorm -> LeakyReLU -> Conv3x3(stride 1, pad 1) to C``,
  followed by ``tanh`` for a Gaussian/tanh model (the seed) and nothing otherwise
  (Bernoulli models output logits).

Any image size (e.g. MNIST 28x28 with 5 levels): the encoder does no explicit padding. Each
``Conv3x3Stride2`` maps a side ``n`` to ``ceil(n / 2)`` (PyTorch's own padding of 1 covers the
odd sides), so the bottleneck side is ``n`` halved-and-rounded-up ``L`` times
(28 -> 14 -> 7 -> 4 -> 2 -> 1). The decoder doubles it ``L`` times (1 -> 32) and the surplus is
cropped at the bottom/right: every strided grid here is anchored at pixel 0 (encoder output ``i``
is centred on input ``2 i``; decoder output ``2 i`` on input ``i``), so the surplus rows/columns
are the ones past the image's end. Outputs therefore always have the input's exact shape, and a
likelihood of ``x`` given the outputs is over the original pixels only. The crop happens right
after the final transposed conv, so the final BatchNorm and the output conv see the image's pixels
only (the inner decoder levels' BatchNorm statistics include the surplus, which those layers do
compute). Equivalently, the encoder treats the image as if zero-padded at the bottom/right.

Flatten order: the encoder flattens its ``[b_h, b_w, h_L]`` NHWC feature map in (h, w, c) order,
whereas PyTorch flattens NCHW in (c, h, w) order. The model stays NHWC-native (no transpose per
step); ``jaxvae.convert`` permutes the rows/columns of ``fc_mu``, ``fc_var`` and ``decoder_input``
when importing a PyTorch checkpoint (tested against a PyTorch fixture with a 4x4 bottleneck).

Initialisation is PyTorch's default (``torch_default_init``: weights and biases
``U(+-1/sqrt(fan_in))``; BatchNorm scale 1, bias 0), so a model trained from scratch starts from
the seed's distribution.

BatchNorm uses PyTorch's settings (momentum 0.1 == Flax momentum 0.9, epsilon 1e-5). Its batch
statistics are those of the array it is given: under ``jax.jit`` over a batch sharded across
devices (``jaxvae.train_step``), that is the global batch.

Parameter tree (stable; ``jaxvae.convert`` and checkpoints rely on it)::

    params/encoder/{conv_i, bn_i (i < L), fc_mu, fc_var}
    params/decoder/{decoder_input, conv_transpose_i, bn_i (i < L - 1),
                    final_conv_transpose, final_bn, final_conv}
    params/pseudo_inputs (prior="vamp" only: [M, H, W, C])
    batch_stats/encoder/bn_i, batch_stats/decoder/{bn_i, final_bn}

Index ``i`` follows PyTorch's ``encoder.{i}`` / ``decoder.{i}`` (decoder level 0 is the one right
after ``decoder_input``).

Mixed precision (``dtype=jnp.bfloat16``): the parameter tree, its float32 dtype and the float32
BatchNorm statistics do not depend on ``dtype``, so a checkpoint written in one dtype restores
in the other. In ``dtype``: the images once they enter the encoder, every convolution and
matmul (float32 parameters are cast to ``dtype`` at the op; their accumulators are float32)
and the activations between layers (BatchNorm outputs, LeakyReLU). In float32: BatchNorm's
batch statistics and normalisation, the tap sums of the GEMM convolutions, bias additions (so
bias gradients are reduced in float32), the mean and log-variance (cast at the encoder's end)
and the decoder's outputs (logits, or means with their ``tanh``), so the reparameterisation,
the KL and every log-likelihood and its sums run in float32. ``tests/test_train_step.py``
checks this on the traced training and evaluation steps and compares a bfloat16 step with a
float32 one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvae import layers, losses

LIKELIHOODS = ("bernoulli", "gaussian")
OUTPUT_ACTIVATIONS = ("tanh", "none")
DECODERS = ("conv", "mlp")
PRIORS = ("standard", "vamp")

# Pseudo-inputs of the VampPrior start as this much N(0, 1) noise around the all-zero image
# (VAE.prior's docstring).
PSEUDO_INPUT_INIT_STD = 0.01

# PyTorch BatchNorm2d defaults: momentum 0.1 (weight of the new batch) == Flax's 0.9 (weight
# of the old running value); epsilon 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def torch_default_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default init of Conv/ConvTranspose/Linear weights and biases: U(+-1/sqrt(fan_in)).

    (``kaiming_uniform_(a=sqrt(5))`` for weights and the matching bias bound.) PyTorch's fan_in is
    ``in_channels * 9`` for a 3x3 Conv2d, ``out_channels * 9`` for a ConvTranspose2d (it reads
    dimension 1 of the ``[in, out, kh, kw]`` weight), ``in_features`` for a Linear.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def bottleneck_shape(image_hw: Sequence[int], num_levels: int) -> tuple[int, int]:
    """Spatial shape ``(b_h, b_w)`` after ``num_levels`` stride-2 convs (n -> ceil(n / 2) each)."""
    h, w = image_hw
    for _ in range(num_levels):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        # Two-pass variance: closer to PyTorch (and to float64) than E[x^2] - E[x]^2.
        use_fast_variance=False,
        # Mixed precision: the input and output are in the compute dtype, but the batch mean
        # and variance are reduced in float32, the normalisation is computed in float32 and
        # rounded once, and scale, bias and the running statistics are float32 (flax's
        # default, made explicit).
        dtype=dtype,
        param_dtype=jnp.float32,
        force_float32_reductions=True,
        name=name,
    )


class ConvEncoder(nn.Module):
    """Images ``x: [B, H, W, C]`` -> ``(mean [B, D], logvar [B, D])`` (float32)."""

    latent_dim: int
    hidden_dims: Sequence[int]
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        h = x.astype(self.dtype)
        for i, features in enumerate(self.hidden_dims):
            init = torch_default_init(h.shape[-1] * 9)
            h = layers.Conv3x3Stride2(
                features, kernel_init=init, bias_init=init, impl=self.conv_impl, name=f"conv_{i}"
            )(h)
            h = _batch_norm(train, self.dtype, f"bn_{i}")(h)
            h = nn.leaky_relu(h, negative_slope=0.01)
        h = h.reshape(h.shape[0], -1)  # (h, w, c) order; see the module docstring.
        init = torch_default_init(h.shape[-1])
        dense = dict(dtype=self.dtype, kernel_init=init, bias_init=init)
        mean = layers.Dense(self.latent_dim, name="fc_mu", **dense)(h)
        logvar = layers.Dense(self.latent_dim, name="fc_var", **dense)(h)
        return mean.astype(jnp.float32), logvar.astype(jnp.float32)


class ConvDecoder(nn.Module):
    """Latents ``z: [B, D]`` -> outputs ``[B, H, W, C]`` (float32; logits or Gaussian means)."""

    hidden_dims: Sequence[int]
    image_shape: tuple[int, int, int]
    output_activation: str = "tanh"
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        height, width, channels = self.image_shape
        dims = tuple(self.hidden_dims)
        b_h, b_w = bottleneck_shape((height, width), len(dims))

        init = torch_default_init(z.shape[-1])
        h = layers.Dense(
            b_h * b_w * dims[-1],
            dtype=self.dtype,
            kernel_init=init,
            bias_init=init,
            name="decoder_input",
        )(z)
        h = h.reshape(h.shape[0], b_h, b_w, dims[-1])
        for i, features in enumerate(reversed(dims[:-1])):
            init = torch_default_init(features * 9)
            h = layers.ConvTranspose3x3Stride2(
                features,
                kernel_init=init,
                bias_init=init,
                impl=self.conv_impl,
                name=f"conv_transpose_{i}",
            )(h)
            h = _batch_norm(train, self.dtype, f"bn_{i}")(h)
            h = nn.leaky_relu(h, negative_slope=0.01)
        init = torch_default_init(dims[0] * 9)
        h = layers.ConvTranspose3x3Stride2(
            dims[0],
            kernel_init=init,
            bias_init=init,
            impl=self.conv_impl,
            name="final_conv_transpose",
        )(h)
        # Crop the surplus of a non-divisible size at the bottom/right (module docstring): the
        # final BatchNorm then sees the image's pixels only, and the 3x3 stride-1 conv zero-pads
        # at the true image border, as PyTorch does for a divisible image.
        h = h[:, :height, :width, :]
        h = _batch_norm(train, self.dtype, "final_bn")(h)
        h = nn.leaky_relu(h, negative_slope=0.01)
        init = torch_default_init(h.shape[-1] * 9)
        h = layers.Conv3x3(
            channels, impl=self.conv_impl, kernel_init=init, bias_init=init, name="final_conv"
        )(h)
        # Outputs (logits / means) leave the compute dtype here: tanh and the likelihood that
        # reduces them run in float32.
        h = h.astype(jnp.float32)
        if self.output_activation == "tanh":
            h = jnp.tanh(h)
        return h


class MLPDecoder(nn.Module):
    """Latents ``z: [B, D]`` -> outputs ``[B, H, W, C]`` through fully connected layers.

    ``Dense(h_1) -> LeakyReLU -> ... -> Dense(h_L) -> LeakyReLU -> Dense(H * W * C)``, reshaped.
    Not part of VanillaVAE: an option (``VAE(decoder_type="mlp")``) for likelihood experiments,
    where the decoder runs K times per image at evaluation and dense layers run near the
    CPU's GEMM peak, unlike the full-resolution layers of the conv decoder.
    """

    hidden_dims: Sequence[int]
    image_shape: tuple[int, int, int]
    output_activation: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm here; the argument keeps ConvDecoder's signature
        h = z
        for i, features in enumerate(self.hidden_dims):
            init = torch_default_init(h.shape[-1])
            h = layers.Dense(
                features, dtype=self.dtype, kernel_init=init, bias_init=init, name=f"dense_{i}"
            )(h)
            h = nn.leaky_relu(h, negative_slope=0.01)
        init = torch_default_init(h.shape[-1])
        h = layers.Dense(
            math.prod(self.image_shape),
            dtype=self.dtype,
            kernel_init=init,
            bias_init=init,
            name="output",
        )(h).astype(jnp.float32)
        if self.output_activation == "tanh":
            h = jnp.tanh(h)
        return h.reshape(h.shape[0], *self.image_shape)


class VAE(nn.Module):
    """PyTorch-VAE's VanillaVAE for images of shape ``image_shape = (H, W, C)``.

    Attributes:
      latent_dim: D, the latent dimension.
      hidden_dims: channels of the encoder's stride-2 levels (the decoder mirrors them).
      image_shape: ``(H, W, C)`` of the data; any H, W >= 1.
      likelihood: ``"bernoulli"`` (decoder outputs logits) or ``"gaussian"`` (decoder outputs
        the mean).
      output_activation: ``"tanh"`` (the seed) or ``"none"``; only used for ``"gaussian"``.
      conv_impl: implementation of the strided convs, passed to ``jaxvae.layers``.
      dtype: compute dtype of the convolutions, matmuls and activations (``float32`` or
        ``bfloat16``). Parameters and BatchNorm statistics are float32 whatever it is, so one
        checkpoint serves both; BatchNorm reduces its statistics in float32, biases are added
        in float32, and the mean, log-variance and decoder outputs are returned float32, so
        every loss reduction runs in float32 (module docstring, "Mixed precision").
      decoder_type: ``"conv"`` (VanillaVAE's, the default) or ``"mlp"`` (:class:`MLPDecoder`).
      decoder_hidden_dims: the decoder's widths. ``None`` (default): the conv decoder mirrors
        ``hidden_dims`` (VanillaVAE). Given: the conv decoder's levels (so the encoder can be
        wider than the decoder, which runs K times per image in an IWAE evaluation) or the
        MLP's hidden widths (required for ``"mlp"``).
      prior: ``"standard"`` (``N(0, I)``, VanillaVAE's; the default) or ``"vamp"``, the
        VampPrior of Tomczak & Welling (2018): the equal-weight mixture of the encoder's
        posteriors at ``num_pseudo_inputs`` learned images ``pseudo_inputs [M, H, W, C]``,

            p(z) = (1/M) sum_m q(z | u_m),

        a parameter of the model next to the encoder and the decoder (the standard prior's
        tree is unchanged). See :meth:`prior_log_density_fn` for how the training and
        evaluation use it and how BatchNorm treats the pseudo-inputs.
        Initialisation: ``u_m = 0.01 * N(0, 1)`` per pixel, small noise around the all-zero
        image (small Gaussian noise is also the default of Tomczak & Welling's code). At the
        start the components are then nearly one Gaussian, the posterior of a blank image,
        and the noise breaks the symmetry between them; training moves them apart.
        Initialising from random training images (their other option) would need the input
        pipeline when the model is built; the noise needs nothing and is the same for every
        dataset and pixel range. The pseudo-inputs are not constrained to the data's range.
      num_pseudo_inputs: ``M``, the VampPrior's number of components (``"vamp"`` only).
    """

    latent_dim: int
    hidden_dims: Sequence[int] = (32, 64, 128, 256, 512)
    image_shape: tuple[int, int, int] = (64, 64, 3)
    likelihood: str = "gaussian"
    output_activation: str = "tanh"
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    decoder_type: str = "conv"
    decoder_hidden_dims: Sequence[int] | None = None
    prior: str = "standard"
    num_pseudo_inputs: int = 500

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.num_pseudo_inputs < 1:
            raise ValueError(f"num_pseudo_inputs must be >= 1, got {self.num_pseudo_inputs}")
        if self.decoder_type not in DECODERS:
            raise ValueError(f"decoder_type must be one of {DECODERS}, got {self.decoder_type!r}")
        if self.decoder_type == "mlp" and not self.decoder_hidden_dims:
            raise ValueError("decoder_type='mlp' needs decoder_hidden_dims (its hidden widths)")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {OUTPUT_ACTIVATIONS}, "
                f"got {self.output_activation!r}"
            )
        if len(tuple(self.image_shape)) != 3 or min(self.image_shape) < 1:
            raise ValueError(
                f"image_shape must be (H, W, C) of positive ints, got {self.image_shape}"
            )
        if len(tuple(self.hidden_dims)) < 1:
            raise ValueError("hidden_dims must name at least one level, got ()")
        super().__post_init__()

    def setup(self) -> None:
        self.encoder = ConvEncoder(
            latent_dim=self.latent_dim,
            hidden_dims=tuple(self.hidden_dims),
            conv_impl=self.conv_impl,
            dtype=self.dtype,
        )
        # Bernoulli outputs are logits: never squashed.
        activation = self.output_activation if self.likelihood == "gaussian" else "none"
        dims = tuple(self.decoder_hidden_dims or self.hidden_dims)
        if self.decoder_type == "mlp":
            self.decoder = MLPDecoder(
                hidden_dims=dims,
                image_shape=tuple(self.image_shape),
                output_activation=activation,
                dtype=self.dtype,
            )
        else:
            self.decoder = ConvDecoder(
                hidden_dims=dims,
                image_shape=tuple(self.image_shape),
                output_activation=activation,
                conv_impl=self.conv_impl,
                dtype=self.dtype,
            )
        if self.prior == "vamp":
            shape = (self.num_pseudo_inputs, *self.image_shape)
            self.pseudo_inputs = self.param(
                "pseudo_inputs", nn.initializers.normal(PSEUDO_INPUT_INIT_STD), shape, jnp.float32
            )

    def encode(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """``x: [..., H, W, C]`` -> ``(mean [..., D], logvar [..., D])``."""
        if x.ndim < 3 or tuple(x.shape[-3:]) != tuple(self.image_shape):
            raise ValueError(
                f"images must have shape [..., H, W, C] with (H, W, C) == image_shape "
                f"{tuple(self.image_shape)}, got an array of shape {tuple(x.shape)}; resize the "
                "data or build the model with the data's image_shape"
            )
        lead = x.shape[:-3]
        mean, logvar = self.encoder(x.reshape((-1, *x.shape[-3:])), train=train)
        return mean.reshape(*lead, -1), logvar.reshape(*lead, -1)

    def decode(self, z: jax.Array, train: bool = False) -> jax.Array:
        """``z: [..., D]`` -> outputs ``[..., H, W, C]`` (logits or Gaussian means)."""
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"latents must have shape [..., {self.latent_dim}] (latent_dim), got {z.shape}"
            )
        # The leading axes are flattened last-axis-major: by the losses' convention the batch
        # is the last of them (z: [K, B, D]), so a batch sharded across devices stays the
        # major axis of the flat batch and the reshapes move no data between devices (flat in
        # (K, B) order, XLA would gather the decoder's inputs and outputs on every device).
        n = z.ndim - 1
        flip = lambda a, k: jnp.transpose(a, (*reversed(range(n)), *range(n, n + k)))  # noqa: E731
        out = self.decoder(flip(z, 1).reshape(-1, self.latent_dim), train=train)
        out = out.reshape(*reversed(z.shape[:-1]), *out.shape[1:])
        return flip(out, out.ndim - n)

    def __call__(
        self, x: jax.Array, key: jax.Array, train: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x: [B, H, W, C]`` -> ``(outputs [B, H, W, C], mean [B, D], logvar [B, D])``.

        ``outputs`` decode one reparameterised sample ``z ~ q(z|x)`` drawn with ``key``.
        """
        mean, logvar = self.encode(x, train=train)
        z = losses.reparameterize(key, mean, logvar)
        return self.decode(z, train=train), mean, logvar

    def pseudo_posteriors(self) -> tuple[jax.Array, jax.Array]:
        """The VampPrior's components: ``(means [M, D], logvars [M, D])`` of ``q(z | u_m)``.

        The pseudo-inputs are encoded with BatchNorm's running statistics (``train=False``),
        also inside a training step (see :meth:`prior_log_density_fn`).
        """
        if self.prior != "vamp":
            raise ValueError(f"the model has no pseudo-inputs: prior={self.prior!r}, not 'vamp'")
        return self.encode(self.pseudo_inputs, train=False)

    def prior_log_density_fn(self) -> Callable[[jax.Array], jax.Array] | None:
        """The ``prior_log_density=`` argument of :mod:`jaxvae.losses` for this model.

        ``None`` for ``prior="standard"``: the losses' own ``N(0, I)``, with the closed-form
        KL. For ``"vamp"``: ``z [..., D] -> log p(z) [...]``, the mixture of
        :meth:`pseudo_posteriors` (``losses.mixture_gaussian_log_density``), whose
        components are encoded once, here, however often the function is called (the
        chunks of ``losses.iwae_log_likelihood``).

        BatchNorm: the pseudo-inputs are encoded with the running statistics
        (``train=False``), also in a training step, whose images are encoded with their batch
        statistics. So the ``M`` pseudo-inputs (500 by default, more than a batch) neither
        enter nor perturb the statistics of the training batch, which stay those of the data,
        and the prior is the same function of the variables in training as in evaluation
        and sampling (which run in eval mode). Its gradient reaches the pseudo-inputs and
        the encoder's parameters, not the running statistics. In a training step the prior
        is built before the batch is encoded, so it uses the statistics the step started
        from.
        """
        if self.prior == "standard":
            return None
        means, logvars = self.pseudo_posteriors()
        return lambda z: losses.mixture_gaussian_log_density(z, means, logvars)

    def prior_log_density(self, z: jax.Array) -> jax.Array:
        """``log p(z)`` ``[...]`` for ``z: [..., D]``: ``N(0, I)`` or the VampPrior."""
        return (self.prior_log_density_fn() or losses.gaussian_log_density)(z)

    def sample_prior(self, key: jax.Array, num_samples: int) -> jax.Array:
        """Latents ``z ~ p(z)``, ``[num_samples, D]`` (float32).

        ``N(0, I)``: ``normal(key, (num_samples, D))``. VampPrior: for each sample a
        component ``m`` uniform in ``0..M-1``, then ``z ~ q(z | u_m)`` (eval mode).
        """
        if self.prior == "standard":
            return jax.random.normal(key, (num_samples, self.latent_dim), jnp.float32)
        component_key, noise_key = jax.random.split(key)
        means, logvars = self.pseudo_posteriors()
        m = jax.random.randint(component_key, (num_samples,), 0, self.num_pseudo_inputs)
        return losses.reparameterize(noise_key, means[m], logvars[m])

    def sample(self, key: jax.Array, num_samples: int) -> jax.Array:
        """Mean images ``[num_samples, H, W, C]`` of ``decode(z)``, ``z ~ p(z)``
        (:meth:`sample_prior`; eval mode)."""
        z = self.sample_prior(key, num_samples)
        return mean_image(self.likelihood, self.decode(z, train=False))

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """Mean image ``[..., H, W, C]`` of ``decode(encode(x).mean)`` (eval mode)."""
        mean, _ = self.encode(x, train=False)
        return mean_image(self.likelihood, self.decode(mean, train=False))


def mean_image(likelihood: str, outputs: jax.Array) -> jax.Array:
    """Decoder outputs ``[..., H, W, C]`` -> mean image in data space (sigmoid(logits) or means)."""
    if likelihood == "bernoulli":
        return jax.nn.sigmoid(outputs)
    if likelihood == "gaussian":
        return outputs
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def make_log_likelihood_fn(
    likelihood: str, obs_logvar: float = 0.0
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``fn(x [B, H, W, C], outputs [..., B, H, W, C]) -> log p(x | z) [..., B]``.

    Summed over ``[H, W, C]``: Bernoulli on logits, or Gaussian with mean ``outputs`` and the fixed
    observation log-variance ``obs_logvar``.
    """
    if likelihood == "bernoulli":
        return lambda x, outputs: losses.bernoulli_log_likelihood(x, outputs, event_ndim=3)
    if likelihood == "gaussian":
        return lambda x, outputs: losses.gaussian_log_likelihood(
            x, outputs, obs_logvar, event_ndim=3
        )
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


__all__ = [
    "DECODERS",
    "LIKELIHOODS",
    "OUTPUT_ACTIVATIONS",
    "PRIORS",
    "PSEUDO_INPUT_INIT_STD",
    "VAE",
    "ConvDecoder",
    "ConvEncoder",
    "MLPDecoder",
    "bottleneck_shape",
    "count_params",
    "torch_default_init",
    "make_log_likelihood_fn",
    "mean_image",
]
