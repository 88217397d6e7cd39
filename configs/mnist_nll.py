"""Dynamically binarized MNIST for the test log-likelihood (ELBO objective), ~75 min on 2 CPU cores.

The recipe behind the README's results table. What differs from ``configs/mnist.py``:

- a fully connected decoder (``model.decoder_type="mlp"``, two hidden layers of 512) after the
  same conv encoder. The decoder runs K = 5000 times per test image in the standard
  evaluation (50 million decoder passes over the test set); dense layers run near the CPU's
  GEMM peak while the conv decoder's full-resolution layers are bound by memory traffic, so
  this decoder makes that evaluation ~4x faster than VanillaVAE's (docs/likelihoods.md),
  and training ~4x faster per image;
- 50 latent dimensions (Burda et al.'s single-stochastic-layer models);
- Adam at 1e-3 with a cosine decay to 0 over the run, 180 epochs (84,375 steps at batch 128:
  73.7 minutes at 2,589 images/s here, 2026-11-26, the README's results table; 250 epochs
  would take ~100);
- evaluation during training at K = 100 (the K = 5000 figure is a separate ``--mode eval``).
"""

from jaxvae.config_utils import base_config


def get_config():
    config = base_config()
    config.name = "mnist_nll"
    config.num_epochs = 180.0
    config.model.latent_dim = 50
    config.model.decoder_type = "mlp"
    config.model.decoder_hidden_dims = (512, 512)
    config.optimizer.schedule = "cosine"
    config.log_every_steps = 500
    config.eval_every_steps = 20_000
    config.checkpoint_every_steps = 2_000
    return config
