"""A seconds-long run for tests: tiny model, batch 16, a few steps (use with mock data)."""

from jaxvae.config_utils import base_config


def get_config():
    config = base_config()
    config.name = "tiny"
    config.batch_size = 16
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2
    config.model.latent_dim = 4
    config.model.hidden_dims = (8, 16)
    config.optimizer.learning_rate = 1e-2
    config.eval.batch_size = 16
    config.eval.iwae_samples = 4
    config.eval.iwae_chunk_size = 2
    config.eval.num_image_grid = 4
    config.eval.interpolation_steps = 4
    return config
