"""The fixed binarization of MNIST (Larochelle & Murray, 2011; tfds ``binarized_mnist``)."""

from jaxvae.config_utils import base_config


def get_config():
    config = base_config()
    config.name = "binarized_mnist"
    config.data.name = "binarized_mnist"
    config.data.binarize = "none"  # already binary
    return config
