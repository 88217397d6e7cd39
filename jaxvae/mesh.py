"""The device mesh of data parallelism: one axis, ``"data"``, over every device of every process.

The global batch is split along its first axis over ``"data"``; parameters, optimizer state
and BatchNorm statistics are replicated. Training, evaluation and the benchmarks all build
their mesh and place their batches with these helpers, so there is one layout in the project.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """1-D mesh ``("data",)`` over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    # Auto axes: inputs placed differently are resharded by jit instead of rejected.
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
    )


def shard_batch(rows: Any, mesh: Mesh) -> jax.Array:
    """This process's rows ``[b, ...]`` (NumPy) -> the global array ``[B, ...]`` over ``"data"``.

    Each process passes only the rows it read; the global batch is their concatenation in
    process order (``B = b * process_count``).
    """
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return jax.make_array_from_process_local_data(sharding, rows)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` fully replicated over ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a value held whole by every device (parameters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


__all__ = ["DATA_AXIS", "make_mesh", "replicate", "replicated_sharding", "shard_batch"]
