"""``configs/mnist_iwae.py`` with the doubly reparameterised gradient (DReG; Tucker et al. 2018).

The same objective, K = 10 IWAE bound, and the same cost per step: only the encoder's gradient
changes (``config.gradient_estimator = "dreg"``, see ``jaxvae.losses.iwae_bound``).
"""

from pathlib import Path

from jaxvae.config_utils import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("mnist_iwae.py"))
    config.name = "mnist_iwae_dreg"
    config.gradient_estimator = "dreg"
    return config
