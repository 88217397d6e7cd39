"""Checkpoint retention (latest N + best by test loss) and the data-iterator state round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxvae import checkpointing
from jaxvae.mesh import make_mesh, replicate


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


def test_checkpoints_of_orbaxs_standard_handler_and_of_jaxvae_read_each_other(tmp_path):
    """jaxvae writes ``state`` with one replica per array (not orbax's replica-parallel
    default): a checkpoint of orbax's ``StandardCheckpointHandler`` on 8 devices (what jaxvae
    wrote before) restores bit-identically, and one of jaxvae's restores with that handler."""
    mesh = make_mesh()
    rng = np.random.default_rng(0)
    state = replicate({"w": rng.normal(size=(64, 33)).astype(np.float32), "step": 7}, mesh)
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    data_state = {"epoch": 1}

    def standard_manager(directory):
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data_iter": ocp.JsonCheckpointHandler(),
        }
        return ocp.CheckpointManager(directory, item_handlers=handlers)

    old = standard_manager(tmp_path / "standard")
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=ocp.args.JsonSave(data_state)
    )
    old.save(1, args=args)
    old.wait_until_finished()
    old.close()
    reader = checkpointing.create_manager(tmp_path / "standard", keep=2, read_only=True)
    got, got_data = checkpointing.restore(reader, 1, target)
    reader.close()
    jax.tree.map(np.testing.assert_array_equal, got, state)
    assert got["w"].sharding == state["w"].sharding and got_data == data_state

    new = checkpointing.create_manager(tmp_path / "jaxvae", keep=2)
    checkpointing.save(new, 1, state, data_state)
    checkpointing.close(new)
    reader = standard_manager(tmp_path / "jaxvae")
    restored = reader.restore(
        1,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data_iter=ocp.args.JsonRestore()
        ),
    )
    reader.close()
    jax.tree.map(np.testing.assert_array_equal, restored["state"], state)
