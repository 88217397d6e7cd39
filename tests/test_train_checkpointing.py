"""Checkpoint retention (latest N + best by test loss) and the data-iterator state round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvae import checkpointing


def small_state(value: float) -> dict:
    return {"w": jnp.full((3,), value), "step": jnp.asarray(int(value), jnp.int32)}


def test_keeps_latest_n_plus_best_and_restores(tmp_path):
    manager = checkpointing.create_manager(tmp_path / "ckpt", keep=2)
    losses = {2: 5.0, 4: 9.0, 6: 8.0}  # evaluated steps; step 2 is the best
    for step in range(1, 7):
        metrics = {"test_neg_elbo": losses[step]} if step in losses else None
        data_state = {"epoch": np.int64(step), "order": np.arange(3)}
        checkpointing.save(manager, step, small_state(step), data_state, metrics)
    checkpointing.close(manager)

    reader = checkpointing.create_manager(tmp_path / "ckpt", keep=2, read_only=True)
    assert sorted(reader.all_steps()) == [2, 5, 6]  # latest two + the best
    assert reader.latest_step() == 6 and reader.best_step() == 2
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), small_state(0))
    state, data_state = checkpointing.restore(reader, 2, target)
    np.testing.assert_array_equal(state["w"], [2.0, 2.0, 2.0])
    assert data_state == {"epoch": 2, "order": [0, 1, 2]}  # NumPy -> JSON types

    wrong = {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "step": target["step"]}
    with pytest.raises(
        checkpointing.CheckpointError, match=r"w: checkpoint \(3,\) vs model \(4,\)"
    ):
        checkpointing.check_compatible(reader, 6, wrong)
    reader.close()
