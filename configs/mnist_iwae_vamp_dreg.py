"""``configs/mnist_iwae.py`` with both the VampPrior (500 pseudo-inputs) and DReG gradients.

``configs/mnist_iwae_dreg.py`` plus ``config.model.prior = "vamp"`` (see
``configs/mnist_vamp.py``).
"""

from pathlib import Path

from jaxvae.config_utils import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("mnist_iwae_dreg.py"))
    config.name = "mnist_iwae_vamp_dreg"
    config.model.prior = "vamp"
    config.model.num_pseudo_inputs = 500
    return config
