"""Dynamically binarized MNIST with a Bernoulli likelihood (the default experiment).

Each training image is re-binarized every time it is drawn (x ~ Bernoulli(pixel / 255)),
the standard protocol for reporting MNIST likelihoods in nats.
"""

from jaxvae.config_utils import base_config


def get_config():
    return base_config()  # base_config() *is* this experiment
