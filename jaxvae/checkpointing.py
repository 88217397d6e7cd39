"""Checkpoints with orbax-checkpoint: the train state plus the data-iterator position.

Layout: ``<workdir>/checkpoints/<step>/{state, data_iter, metrics}``. ``state`` is the whole
:class:`~jaxvae.train_state.TrainState` (params, batch_stats, opt_state, step, PRNG key);
``data_iter`` is the input iterator's JSON state, so a resumed run sees the same batches.

Several processes: every process takes part in every save and restore (one replica of each
array of ``state`` is written, process 0's: the state is replicated; then process 0 commits
the step by renaming its temporary folder, so a step folder is complete or absent).
``data_iter`` is written by process 0 alone and read back by every process; that is right
because the iterator state is a position in the *global* batch stream, the same in every
process; :func:`save` checks that it is.

Retention (one ``CheckpointManager``, one preservation policy): keep the latest
``keep_checkpoints`` steps, *and* the single best step by test negative ELBO among the
checkpoints saved with eval metrics (``AnyPreservationPolicy(LatestN, BestN)``). Checkpoints
saved between evaluations carry no metrics; they live only as long as they are among the latest.
One manager (rather than a second "best" directory) keeps one step numbering, one atomic-write
protocol, and ``best_step()`` for ``--mode eval --checkpoint best``.

Saving is asynchronous: call :func:`close` (which waits) before the process exits.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "test_neg_elbo"
_METRICS_FILE = "metrics/metrics"  # orbax's JSON of the metrics saved with a checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says what to do."""


class CheckpointGoneError(CheckpointError):
    """A checkpoint was deleted while it was being read: a training run in the same workdir
    removes its older checkpoints as it saves new ones (``keep_checkpoints``). Reading the
    list of checkpoints again finds the ones there now."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written. orbax's background threads of the failed save may
    wait minutes for signals that never come; a program should exit without joining them."""


class _OrbaxRecords(absl_logging.logging.Filter):
    """Drops the log records of orbax's own modules."""

    def filter(self, record) -> bool:
        return "orbax" not in record.pathname


def hide_orbax_logs() -> None:
    """Hides orbax's log records, for a command-line program: warnings about what jaxvae does
    on purpose (checkpoints saved without metrics, read-only reads) and the tracebacks of
    orbax's background threads when a save fails, also those Python reports as unraisable
    exceptions. Every orbax failure still reaches the caller as an exception (a
    :class:`CheckpointError`), reported there in one line."""
    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _OrbaxRecords) for f in logger.filters):
        logger.addFilter(_OrbaxRecords())
    sys.unraisablehook = _drop_closed_loop_noise


def _drop_closed_loop_noise(unraisable) -> None:
    """``sys.unraisablehook``: orbax's threads of a failed save keep calling into an event loop
    that is already closed ("Event loop is closed"); the failure itself is reported once."""
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def _best_fn(metrics: dict[str, Any]) -> float:
    return float(metrics[BEST_METRIC])


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's handler for ``state``, with one replica writing each array.

    orbax's default on CPU and TPU is "replica-parallel" saving: each replica of an array
    writes a slice of it, which takes a slicing program per array and replica. For this state
    (replicated, tens of MB at most) that costs more than it saves: with 8 CPU devices and
    ``configs/mnist.py``, a process's first save takes 0.39 CPU-s instead of 4.76 and the
    next ones 0.27 instead of 0.68 (``benchmarks/checkpoint_save.py``; orbax already turns
    it off on GPU). The files are orbax's standard ones, readable by either handler (without
    orbax's per-host array metadata, which records typed PRNG keys: the state holds none).
    """
    one_replica = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    handlers = [
        (t, one_replica if t is jax.Array else ocp.type_handlers.get_type_handler(t))
        for t in ocp.type_handlers.supported_types()
    ]
    registry = ocp.type_handlers.create_type_handler_registry(*handlers)
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def create_manager(
    directory: str | Path, keep: int, read_only: bool = False
) -> ocp.CheckpointManager:
    """A manager over ``directory`` keeping the latest ``keep`` steps plus the best one."""
    policy = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=keep),
            # reverse=True sorts by descending loss, so the kept "last n" are the lowest.
            policies.BestN(
                get_metric_fn=_best_fn, reverse=True, n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_fn,
        best_mode="min",
        preservation_policy=None if read_only else policy,
        create=not read_only,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,
    )
    try:
        return ocp.CheckpointManager(
            Path(directory).absolute(),
            options=options,
            # Handlers up front so a fresh manager can read metadata before any restore.
            item_handlers={
                "state": _state_handler(),
                "data_iter": ocp.JsonCheckpointHandler(),
            },
        )
    except Exception as e:  # noqa: BLE001 - any failure to list the checkpoints: one message
        raise _unlistable_error(Path(directory), e) from e


def _unlistable_error(directory: Path, cause: BaseException) -> CheckpointError:
    """The message for checkpoints orbax cannot list, naming the damaged file where it is one
    of the per-checkpoint metrics files that orbax reads to find the best checkpoint."""
    for metrics in sorted(directory.glob(f"*/{_METRICS_FILE}")):
        try:
            json.loads(metrics.read_text())
        except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
            step = metrics.parents[1]
            return CheckpointError(
                f"{metrics} (the evaluation metrics of checkpoint {step.name}, read to find the "
                f"best checkpoint) is damaged. Nothing was changed; delete that checkpoint "
                f"(rm -r {step}) to use the others, or restore the file from a copy."
            )
    return CheckpointError(
        f"The checkpoints in {directory} could not be listed ({root_cause(cause)}). Nothing "
        "was changed; fix that folder or restore it from a copy, or use a fresh --workdir."
    )


def _jsonable(tree: Any) -> Any:
    """NumPy scalars/arrays -> Python ints/floats/lists (the iterator state goes to JSON)."""
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return tree.tolist()
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_state: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> None:
    """Starts an asynchronous save of ``state`` and ``data_state`` at ``step``.

    ``metrics`` (with ``test_neg_elbo``) marks a checkpoint as a candidate for "best".
    Raises :class:`CheckpointError` when this save, or the previous asynchronous one, fails.
    """
    _check_same_in_every_process(data_state)
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data_iter=ocp.args.JsonSave(_jsonable(data_state)),
            ),
            metrics=metrics,
            force=True,
        )
    except Exception as e:  # noqa: BLE001 - any write failure gets the same actionable message
        raise write_error(manager, e) from e


def _check_same_in_every_process(data_state: dict[str, Any]) -> None:
    """Raises unless every process holds the same iterator state (one copy is written)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils  # noqa: PLC0415

    text = json.dumps(_jsonable(data_state), sort_keys=True).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest()[:8], np.uint32)
    multihost_utils.assert_equal(
        digest,
        "the input iterators of the processes are in different states, but a checkpoint "
        "holds one iterator state (process 0's); every process would resume from it",
    )


def _shapes(tree: Any) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(getattr(v, "shape", ())) for p, v in flat}


def check_compatible(manager: ocp.CheckpointManager, step: int, target: Any) -> None:
    """Raises :class:`CheckpointError` if the saved tree or shapes differ from ``target``."""
    try:
        meta = manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is a corrupt checkpoint
        raise _corrupt_error(manager, step, root_cause(e)) from e
    if meta is None:
        raise _corrupt_error(manager, step, "no state metadata")
    saved, wanted = _shapes(meta), _shapes(target)
    # orbax stores a TrainState dataclass as a dict: compare on the leaf paths' last parts.
    saved = {_norm(k): v for k, v in saved.items()}
    wanted = {_norm(k): v for k, v in wanted.items()}
    if saved != wanted:
        diff = [
            f"{k}: checkpoint {saved.get(k)} vs model {wanted.get(k)}"
            for k in sorted(saved.keys() | wanted.keys())
            if saved.get(k) != wanted.get(k)
        ]
        raise CheckpointError(
            f"The checkpoint at step {step} in {manager.directory} was written by a different "
            f"model (parameter tree differs):\n  "
            + "\n  ".join(diff[:10])
            + ("\n  ..." if len(diff) > 10 else "")
            + "\nUse a fresh --workdir for this config, or the config that wrote this workdir."
        )


def _norm(path: str) -> str:
    # "['params']['x']" and ".params['x']" both -> "params/x"
    for ch in "[]'\".":
        path = path.replace(ch, "/")
    return "/".join(p for p in path.split("/") if p)


def _corrupt_error(manager: ocp.CheckpointManager, step: int, cause: Any) -> CheckpointError:
    """The one message for a checkpoint that cannot be read (metadata or arrays), unless it
    is no longer there: then the error says so (a folder that is gone is not corrupt, and
    deleting another is no remedy)."""
    path = Path(manager.directory) / str(step)
    if not path.exists():
        return CheckpointGoneError(
            f"Checkpoint {path} was deleted while it was being read (a run training in "
            f"{path.parent.parent} deletes its older checkpoints as it saves new ones). Run the "
            f"command again (it picks from the checkpoints there then), or read a copy of the "
            f"workdir."
        )
    return CheckpointError(
        f"Checkpoint {path} could not be read ({cause}). It is probably incomplete or corrupt "
        f"(e.g. the run was killed while writing it). Delete that folder (rm -r {path}) to "
        f"resume from the previous checkpoint, or start over with a fresh --workdir."
    )


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """``(state, data_state)`` at ``step``; ``target`` is the abstract (ShapeDtypeStruct) state."""
    check_compatible(manager, step, target)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
                ),
                data_iter=ocp.args.JsonRestore(),
            ),
        )
    except Exception as e:  # noqa: BLE001 - report any read failure the same, actionable way
        raise _corrupt_error(manager, step, root_cause(e)) from e
    return restored["state"], restored["data_iter"]


def write_error(manager: ocp.CheckpointManager, cause: BaseException) -> CheckpointWriteError:
    """The one message for a checkpoint that could not be written (no space, no permission)."""
    directory = Path(manager.directory)
    kept = sorted(manager.all_steps())
    return CheckpointWriteError(
        f"Could not write a checkpoint in {directory}: {root_cause(cause)}. The checkpoints "
        f"already there ({', '.join(map(str, kept)) or 'none'}) are intact; make room or fix "
        "the folder's permissions, then run the same command again to resume from the latest."
    )


def root_cause(e: BaseException) -> str:
    """The innermost exception's ``Type: message`` (orbax wraps the OS error several times),
    its first line, without the whole TensorStore spec that TensorStore appends."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", str(e).split("\n", 1)[0])
    return f"{type(e).__name__}: {text}"


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for pending asynchronous saves, then releases the manager.

    Raises :class:`CheckpointError` when a pending save failed.
    """
    first = None
    for finish in (manager.wait_until_finished, manager.close):  # close even after a failure
        try:
            finish()
        except Exception as e:  # noqa: BLE001 - reported once, as the first failure
            first = first or e
    if first is not None:
        raise write_error(manager, first) from first


__all__ = [
    "BEST_METRIC",
    "CheckpointError",
    "CheckpointGoneError",
    "CheckpointWriteError",
    "check_compatible",
    "close",
    "create_manager",
    "hide_orbax_logs",
    "restore",
    "root_cause",
    "save",
    "write_error",
]
