"""``configs/mnist_iwae.py`` with both the VampPrior (500 pseudo-inputs) and DReG gradients.

``configs/mnist_iwae_dreg.py`` plus ``config.model.prior = "vamp"`` (see
``configs/mnist_vamp.py``). Costly here: besides encoding the 500 pseudo-inputs, each step
evaluates the mixture for all K * B = 1,280 samples (``[K, B, M, D]`` terms, forward and
backward). A 150-step ``train.py`` run on real MNIST (2026-12-02, load average ~7 from other
sessions) trained at ~110 images/s; lower ``--config.num_epochs`` for a 90-minute run.
"""

from pathlib import Path

from jaxvae.config_utils import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("mnist_iwae_dreg.py"))
    config.name = "mnist_iwae_vamp_dreg"
    config.model.prior = "vamp"
    return config
