"""``configs/mnist_nll.py`` (the ELBO recipe) with the VampPrior (Tomczak & Welling 2018).

The prior is a mixture of the encoder's posteriors at 500 learned pseudo-inputs
(``config.model.prior = "vamp"``, ``jaxvae.models.VAE``); the KL is estimated by Monte Carlo.
Each step also encodes the 500 pseudo-inputs (and back-propagates through them).
"""

from pathlib import Path

from jaxvae.config_utils import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("mnist_nll.py"))
    config.name = "mnist_vamp"
    config.model.prior = "vamp"
    config.model.num_pseudo_inputs = 500
    return config
