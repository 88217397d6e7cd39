"""jaxvae: a functional JAX/Flax convolutional VAE."""

__version__ = "0.1.0"
