"""Fashion-MNIST, dynamically binarized, Bernoulli likelihood (same model as MNIST)."""

from jaxvae.config_utils import base_config


def get_config():
    config = base_config()
    config.name = "fashion_mnist"
    config.data.name = "fashion_mnist"
    return config
