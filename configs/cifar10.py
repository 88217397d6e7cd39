"""CIFAR-10 in [-1, 1] with a fixed-variance Gaussian likelihood and a tanh output."""

import math

from jaxvae.config_utils import base_config


def get_config():
    config = base_config()
    config.name = "cifar10"
    config.data.name = "cifar10"
    config.data.binarize = "none"
    config.data.pixel_range = "symmetric"
    config.model.latent_dim = 128
    config.model.hidden_dims = (32, 64, 128, 256)
    config.model.likelihood = "gaussian"
    config.model.output_activation = "tanh"
    # sigma = 0.1 on the [-1, 1] scale: with the unit variance a Gaussian ELBO ignores detail.
    config.model.obs_logvar = 2 * math.log(0.1)
    config.num_epochs = 128.0  # 50,000 steps at batch 128
    config.eval.batch_size = 400
    return config
