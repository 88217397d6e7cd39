"""The seed experiment: PyTorch-VAE ``configs/vae.yaml`` (VanillaVAE on 64x64 CelebA).

VanillaVAE with latent 128 and hidden dims (32, 64, 128, 256, 512); CelebA center-cropped to
148 then resized to 64x64 in [-1, 1]; batch 64; Adam lr 0.005 (weight decay 0); ExponentialLR
gamma 0.95 stepped once per epoch; kld_weight 0.00025; 100 epochs; seed 1265. The objective is
PyTorch-VAE's ``vanilla_vae_loss``; switch to the true ELBO with ``--config.objective=elbo``.
"""

from jaxvae.config_utils import base_config


def get_config():
    config = base_config()
    config.name = "celeba"
    config.seed = 1265
    config.batch_size = 64
    config.num_epochs = 100.0  # resolved to steps at run time from the split size and batch
    config.log_every_steps = 200
    config.eval_every_steps = 5_000
    config.checkpoint_every_steps = 2_500
    config.objective = "vanilla_vae_loss"
    config.kld_weight = 0.00025

    config.data.name = "celeb_a"
    config.data.eval_split = "test"
    config.data.binarize = "none"
    config.data.pixel_range = "symmetric"
    config.data.center_crop = 148
    config.data.image_size = 64
    config.data.in_memory = False  # ~200k images: streamed with tf.data

    config.model.latent_dim = 128
    config.model.hidden_dims = (32, 64, 128, 256, 512)
    config.model.likelihood = "gaussian"
    config.model.output_activation = "tanh"
    config.model.obs_logvar = 0.0

    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 0.005
    config.optimizer.schedule = "exponential"
    config.optimizer.decay_rate = 0.95
    config.optimizer.transition_steps = 0  # one epoch: ExponentialLR stepped per epoch

    config.eval.batch_size = 256
    config.eval.iwae_samples = 100
    return config
