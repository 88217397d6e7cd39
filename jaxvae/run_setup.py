"""Setting up a run: every check that can refuse it, then the pieces it runs with.

:func:`setup` validates the config against the devices, finds the dataset, compares the
workdir's ``config.json`` and checkpoints with the config, and builds the model, the optimizer
and the jitted programs (:class:`Programs`, compiled on first call). It writes nothing: a run it
refuses leaves the workdir as it was. Training (:mod:`jaxvae.train_lib`) and the use of a trained
workdir (:mod:`jaxvae.inference`) both start here.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jaxvae import (
    checkpointing,
    compilation_cache,
    config_utils,
    distributed,
    evaluate,
    input_pipeline,
    optim,
    paths,
    workdir_files,
)
from jaxvae import train_state as ts
from jaxvae.mesh import make_mesh, replicated_sharding
from jaxvae.train_step import make_train_step


class WorkdirMismatchError(RuntimeError):
    """The workdir holds a run of a different model; nothing was written."""


# config.model fields that change how the model computes, not what it is: the parameters and
# BatchNorm statistics are float32 in either compute dtype, so a run started in float32 (say on
# a CPU) may resume or be evaluated in bfloat16 (on a TPU), and back.
_COMPUTE_ONLY_MODEL_FIELDS = ("dtype",)


def _without_compute_only(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a ``config.json`` dict) without :data:`_COMPUTE_ONLY_MODEL_FIELDS`."""
    model = {k: v for k, v in config["model"].items() if k not in _COMPUTE_ONLY_MODEL_FIELDS}
    return {**config, "model": model}


@dataclasses.dataclass(frozen=True)
class Programs:
    """The model and the jitted functions of a config (compiled lazily, on first call)."""

    model: Any
    schedule: Any
    init_fn: Any  # () -> TrainState (not jitted; see init)
    init: Any  # jitted init_fn, output replicated
    train_step: Any
    eval_step: Any
    pictures: Any
    target: Any  # abstract TrainState (shapes, dtypes, replicated shardings) of init_fn()


# Programs already built in this process, newest last: a second run, evaluation or load of the
# same config (a notebook, the tests) reuses their traced and compiled code instead of tracing
# and lowering about 80 programs again. A few entries only: each holds compiled executables.
_PROGRAMS_KEPT = 4
_built: collections.OrderedDict[tuple, Programs] = collections.OrderedDict()
# Config fields that only set the run's length (see build_programs).
_RUN_LENGTH = ("num_train_steps", "num_epochs")


def build_programs(
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, int, int],
    num_train_steps: int,
    steps_per_epoch: int,
    mesh: Mesh,
) -> Programs:
    """The model, optimizer and jitted step functions of ``config`` (compiled on first call).

    Built once per process for each distinct (config, image shape, schedule length, mesh):
    a later call with equal values returns the same :class:`Programs`. The run's length
    (``config.num_train_steps`` / ``num_epochs``, ``num_train_steps``, ``steps_per_epoch``)
    reaches the programs only through the learning-rate schedule, so it counts only as the
    schedule's length (:func:`jaxvae.optim.schedule_length`): runs of 2 and 4 steps at a
    constant rate share their programs, cosine-decayed ones do not. The programs close over a
    copy of ``config``, so changing ``config`` afterwards cannot reach them (and they must not
    read its run-length fields, which differ between the runs sharing them).
    """
    fields = {k: v for k, v in config_utils.to_dict(config).items() if k not in _RUN_LENGTH}
    key = (
        json.dumps(fields, sort_keys=True),
        tuple(image_shape),
        optim.schedule_length(config.optimizer, num_train_steps, steps_per_epoch),
        mesh,
    )
    if key in _built:
        _built.move_to_end(key)
        return _built[key]
    config = copy.deepcopy(config)  # what the programs read when they are traced, later
    model = ts.build_model(config, image_shape)
    tx, schedule = optim.create_optimizer(config.optimizer, num_train_steps, steps_per_epoch)

    def init_fn():
        return ts.init_train_state(model, tx, config.seed)

    programs = Programs(
        model=model,
        schedule=schedule,
        init_fn=init_fn,
        init=jax.jit(init_fn, out_shardings=replicated_sharding(mesh)),
        train_step=make_train_step(model, tx, config, mesh),
        eval_step=evaluate.make_eval_step(model, config, mesh),
        pictures=evaluate.make_picture_fn(
            model, config.eval.num_image_grid**2, config.eval.interpolation_steps
        ),
        target=ts.abstract_state(init_fn, mesh),
    )
    _built[key] = programs
    while len(_built) > _PROGRAMS_KEPT:
        _built.popitem(last=False)
    return programs


@dataclasses.dataclass
class Setup:
    config: ml_collections.ConfigDict
    workdir: Path
    mesh: Mesh
    info: Any  # input_pipeline.DatasetInfo; None when sampling without the dataset
    num_train_steps: int  # resolved from config.num_train_steps or config.num_epochs
    programs: Programs
    manager: Any
    target: Any  # abstract TrainState


def setup(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    for_training: bool,
    *,
    needs_data: bool = True,
) -> Setup:
    """Validates everything and builds the pieces; writes nothing (in the workdir).

    ``needs_data=False`` (drawing prior samples, loading the model) never downloads the dataset
    (it is used when prepared, or preparable from ``config.data.manual_dir``) and accepts one
    that cannot be had: then ``Setup.info`` is None, the image shape comes from
    tensorflow-datasets' description of the dataset (no data needed) and the optimizer's
    schedule length is a placeholder (nothing trains). Only a dataset whose images vary in size
    still needs its data (the dataset's error is raised as usual).
    """
    compilation_cache.enable()  # before anything compiles: a second start loads its programs
    workdir = Path(workdir)
    mesh = make_mesh()
    config_utils.validate(config, mesh.size)
    try:
        info = input_pipeline.get_dataset_info(config.data, download=needs_data)
        missing = None
    except input_pipeline.DatasetNotFoundError as e:
        if needs_data:
            raise
        info, missing = None, e

    ckpt_dir = workdir / "checkpoints"
    old = workdir_files.read_config(workdir)  # raises DamagedFileError
    if for_training:
        check_metrics_history(workdir, ckpt_dir)
    if old is not None and ckpt_dir.exists():
        new = config_utils.to_dict(config)
        diff = config_utils.model_config_diff(
            _without_compute_only(old), _without_compute_only(new)
        )
        if diff:
            raise WorkdirMismatchError(
                f"The workdir {workdir} holds a run of a different model; its config.json "
                f"differs in:\n  " + "\n  ".join(diff) + "\nNothing was changed. Use a fresh "
                "--workdir, or the config that wrote this workdir."
            )
        diff = config_utils.resume_config_diff(old, new) if for_training else []
        if diff:
            raise WorkdirMismatchError(
                f"The workdir {workdir} holds a run that cannot be resumed with these settings "
                f"(they fix the data order and position saved in its checkpoints):\n  "
                + "\n  ".join(diff)
                + "\nNothing was changed. Resume with the values in its config.json, or use a "
                "fresh --workdir."
            )

    manager = latest = None
    if ckpt_dir.exists():
        # Read-only: inspecting a workdir must never change it.
        manager = checkpointing.create_manager(ckpt_dir, config.keep_checkpoints, read_only=True)
        latest = manager.latest_step()
    elif not for_training:
        if (workdir / workdir_files.METRICS).exists():
            raise checkpointing.CheckpointError(
                f"{ckpt_dir} is missing, though {workdir} holds a trained run (its "
                f"{workdir_files.METRICS}): the checkpoints were moved or deleted; put them back."
            )
        raise checkpointing.CheckpointError(
            f"No checkpoints in {ckpt_dir}: train first "
            f"(python train.py --config <config> --workdir {workdir})."
            + workdir_files.enclosing_workdir_hint(workdir)
        )
    if info is None:
        image_shape = _image_shape_without_data(config, missing)
        num_train = 0  # the schedule's length is not needed to draw samples
    else:
        image_shape, num_train = tuple(info.image_shape), info.num_train
    steps_per_epoch = max(1, num_train // config.batch_size)
    num_train_steps = config_utils.resolve_train_steps(config, num_train)
    programs = build_programs(config, image_shape, num_train_steps, steps_per_epoch, mesh)
    target = programs.target
    if latest is not None:
        try:
            checkpointing.check_compatible(manager, latest, target)
        except checkpointing.CheckpointGoneError:
            if for_training:
                raise
            # A run training in this workdir deleted it; the reader restores (and checks) the
            # checkpoint it picks from those there then.
    if for_training and manager is not None:
        manager.close()  # training opens its own, writing manager once all checks passed
        manager = None
    if for_training and latest is not None and latest > num_train_steps:
        raise WorkdirMismatchError(
            f"The workdir {workdir} holds a run trained to step {latest}, past this run's last "
            f"step, {num_train_steps} (num_train_steps, or num_epochs): nothing to train. "
            "Nothing was changed. Train it on with a larger --config.num_train_steps, evaluate "
            "it with --mode eval, or use a fresh --workdir."
        )
    distributed.sync_processes("jaxvae:setup")  # all inspected the workdir; none wrote yet
    return Setup(config, workdir, mesh, info, num_train_steps, programs, manager, target)


def _image_shape_without_data(
    config: ml_collections.ConfigDict, missing: input_pipeline.DatasetNotFoundError
) -> tuple[int, int, int]:
    """``(H, W, C)`` of a model whose dataset is not here: from tensorflow-datasets' description
    of the dataset (its code, no data) with the config's crop and resize; the checkpoint is then
    checked against it as always. Raises ``missing`` for a dataset whose images vary in size."""
    try:
        shape = input_pipeline.catalog_image_shape(config.data)
    except input_pipeline.DataConfigError:  # a crop that does not fit: say so, not "missing"
        raise
    except ValueError:  # images of varying size: only the data say which
        raise missing from None
    if jax.process_index() == 0:
        print(
            f"note: {config.data.name} is not available here ("
            f"{str(missing).splitlines()[0]}); going on without it: the image shape comes "
            f"from tensorflow-datasets' description of {config.data.name}, and there are no "
            "reconstructions.",
            file=sys.stderr,
            flush=True,
        )
    return shape


def check_metrics_history(workdir: Path, ckpt_dir: Path) -> None:
    """Refuses to train on a damaged ``metrics.jsonl``, or on one that records training whose
    ``checkpoints/`` is gone: the run would start over and drop that record.

    (A ``checkpoints/`` folder with no step in it is a run stopped before its first save; it
    starts over as it should.)
    """
    path = workdir / workdir_files.METRICS
    steps = [r["step"] for r in workdir_files.read_jsonl(path) if isinstance(r.get("step"), int)]
    if steps and not ckpt_dir.exists():
        raise checkpointing.CheckpointError(
            f"{ckpt_dir} is missing, but {path} records training up to step {max(steps)}: the "
            "checkpoints were moved or deleted, and training now would start over and drop "
            "that record. Nothing was changed; put the checkpoints back, use a fresh --workdir, "
            f"or move {path.name} away to start over in this one."
        )


def check_writable(workdir: Path) -> None:
    """Refuses, before anything happens, a workdir that is a file, that cannot be written, or
    that lies inside another run's ``checkpoints/`` (orbax's folder of that run)."""
    reason = paths.not_writable_reason(workdir)
    if reason is not None:
        raise config_utils.ConfigError(
            f"--workdir {workdir} cannot be written ({reason}); choose a folder you can write to."
        )
    run = workdir_files.enclosing_workdir(workdir)
    if run is not None and run / "checkpoints" in [workdir.absolute(), *workdir.absolute().parents]:
        raise config_utils.ConfigError(
            f"--workdir {workdir} is inside the checkpoints of the run in {run}; train in a "
            f"folder of its own (--workdir {run} resumes that run)."
        )


__all__ = [
    "Programs",
    "Setup",
    "WorkdirMismatchError",
    "build_programs",
    "check_metrics_history",
    "check_writable",
    "setup",
]
