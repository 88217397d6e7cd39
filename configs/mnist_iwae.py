"""``configs/mnist_nll.py`` trained with the IWAE objective (Burda et al.), K = 10 samples.

Each image costs about 3x an ELBO step here (10 decoder passes next to one encoder pass), so
the run is given fewer epochs to stay within ~90 minutes on 2 CPU cores.
"""

from pathlib import Path

from jaxvae.config_utils import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("mnist_nll.py"))
    config.name = "mnist_iwae"
    config.objective = "iwae"
    config.iwae_samples = 10
    config.num_epochs = 70.0
    return config
