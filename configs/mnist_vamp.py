"""``configs/mnist_nll.py`` (the ELBO recipe) with the VampPrior (Tomczak & Welling 2018).

The prior is a mixture of the encoder's posteriors at 500 learned pseudo-inputs
(``config.model.prior = "vamp"``, ``jaxvae.models.VAE``); the KL is estimated by Monte Carlo.
Each step also encodes the 500 pseudo-inputs and back-propagates through them, so the encoder
sees 628 images per step instead of 128: 1,017-1,089 images/s in two benchmark runs
(2026-12-02, benchmarks/README.md), against 2,589 for ``mnist_nll`` in its run. The 180
epochs of ``mnist_nll`` therefore take about three hours here, not 74 minutes: for a
90-minute run lower ``--config.num_epochs`` (or ``--config.model.num_pseudo_inputs``).
"""

from pathlib import Path

from jaxvae.config_utils import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("mnist_nll.py"))
    config.name = "mnist_vamp"
    config.model.prior = "vamp"
    config.model.num_pseudo_inputs = 500
    return config
