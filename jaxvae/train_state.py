"""The training state (one pytree: everything a checkpoint must hold but the data position)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from jaxvae import models
from jaxvae.mesh import replicated_sharding


@flax.struct.dataclass
class TrainState:
    """``step`` (int32 scalar), ``params``, ``batch_stats``, ``opt_state`` and ``key``.

    ``key`` is the raw ``uint32[2]`` base key of the training noise; the noise of step ``t`` is
    drawn from ``fold_in(key, t)``, so a resumed run draws exactly what an uninterrupted one would.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def build_model(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> models.VAE:
    """The VAE of ``config.model`` for images ``(H, W, C)``."""
    m = config.model
    return models.VAE(
        latent_dim=m.latent_dim,
        hidden_dims=tuple(m.hidden_dims),
        image_shape=tuple(image_shape),
        likelihood=m.likelihood,
        output_activation=m.output_activation,
        conv_impl=m.conv_impl,
        dtype=jnp.dtype(m.dtype),
        decoder_type=m.decoder_type,
        # () = mirror hidden_dims (VanillaVAE).
        decoder_hidden_dims=tuple(m.decoder_hidden_dims) or None,
        prior=m.prior,
        num_pseudo_inputs=m.num_pseudo_inputs,
    )


def init_train_state(model: models.VAE, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh state from ``seed``: ``PRNGKey(seed)`` splits into the init key and the noise key."""
    init_key, noise_key = jax.random.split(jax.random.PRNGKey(seed))
    dummy = jnp.zeros((1, *model.image_shape), jnp.float32)
    # train=False: initialisation leaves the BatchNorm statistics at their initial values.
    variables = model.init({"params": init_key}, dummy, jax.random.PRNGKey(0), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        key=noise_key,
    )


def abstract_state(state_fn, mesh: Mesh) -> TrainState:
    """``ShapeDtypeStruct`` tree (replicated shardings) of ``state_fn()``, computing nothing."""
    shapes = jax.eval_shape(state_fn)
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


__all__ = ["TrainState", "abstract_state", "build_model", "init_train_state"]
