"""``configs/mnist_iwae.py`` with both the VampPrior (500 pseudo-inputs) and DReG gradients.

``configs/mnist_iwae_dreg.py`` plus ``config.model.prior = "vamp"`` (see
``configs/mnist_vamp.py``). Besides encoding the 500 pseudo-inputs, each step evaluates
the mixture for all K * B = 1,280 samples: 706-729 images/s in two benchmark runs against
1,756-1,869 for ``mnist_iwae`` (benchmarks/README.md); ``train.py`` ran at 669-701. Hence 50
epochs, not ``mnist_iwae``'s 70 (about 1 h 45 min here): 65-75 min on 2 CPU cores (the same
recipe without DReG trained in 65.3 min alone), and 83.14 nats at K = 5000 (docs/likelihoods.md).
"""

from pathlib import Path

from jaxvae.config_utils import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("mnist_iwae_dreg.py"))
    config.name = "mnist_iwae_vamp_dreg"
    config.model.prior = "vamp"
    config.num_epochs = 50.0
    return config
