"""What ``train.py`` needs beyond its flags: flag checks, choosing the config, user errors.

``train.py`` defines the flags and calls :func:`main`; this module holds the rest so that the
script stays a page long and the logic is importable and tested.

- :func:`parse_flags` is the absl ``flags_parser``: it rejects a misspelt ``--config.<field>``
  with the list of valid fields (absl's own message names none) before absl parses anything.
- :func:`main` resolves the config (``--config`` with its overrides, or the workdir's own
  ``config.json`` for ``--mode eval|sample``), runs the mode, and turns the errors a user can
  fix into one ``error: ...`` line and exit status 1, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import jax
import ml_collections
from absl import flags, logging

import jaxvae
from jaxvae import (
    checkpointing,
    config_utils,
    distributed,
    inference,
    input_pipeline,
    preemption,
    run_setup,
    train_lib,
    workdir_config,
    workdir_files,
    workdir_lock,
)

# Errors a user can fix; reported as one message and exit status 1, without a traceback.
USER_ERRORS = (
    config_utils.ConfigError,
    *input_pipeline.ERRORS,
    run_setup.WorkdirMismatchError,
    train_lib.TrainingDivergedError,
    checkpointing.CheckpointError,
    workdir_files.DamagedFileError,
    workdir_lock.WorkdirBusyError,
    distributed.ProcessMismatchError,
)


def fail(message: str, status: int = 1, *, at_once: bool = False) -> NoReturn:
    """Prints ``error: message`` to stderr and exits with ``status``; ``at_once``: with
    ``os._exit``, skipping the interpreter's shutdown (threads still at work would hold or
    crash it), once stdout is flushed."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if at_once:
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


# What --mode eval|sample may change on a workdir's own config.json (no --config): where the
# data are, which split is evaluated and how, and the compute dtype. Any other field would
# describe another training run than the one whose checkpoints are there.
INFERENCE_OVERRIDES = (
    "eval.",
    "data.eval_split",
    "data.data_dir",
    "data.manual_dir",
    "model.dtype",
)
_WORKDIR_CONFIG_FILE = Path(__file__).with_name("workdir_config.py")


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name=value`` / ``--name value`` in ``argv`` (the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _workdir_config_flag(workdir: str, keys: Sequence[str]) -> str:
    """``--config`` for ``--mode eval|sample`` without one: the workdir's ``config.json``,
    checked here (absl would print a traceback), with only :data:`INFERENCE_OVERRIDES`."""
    try:
        saved = workdir_files.read_config(workdir)
    except workdir_files.DamagedFileError as e:
        fail(str(e))
    if saved is None:
        fail(
            f"--workdir {workdir} holds no {workdir_files.CONFIG} (is it a trained run?); give "
            "the config it was trained with: --config <file>."
            + workdir_files.enclosing_workdir_hint(workdir),
            2,
        )
    refused = [f"--config.{k}" for k in keys if not k.startswith(INFERENCE_OVERRIDES)]
    if refused:
        fail(
            f"{', '.join(refused)} would change the run whose checkpoints are in --workdir "
            f"{workdir}; without --config, --mode eval|sample may set only "
            f"{', '.join(k + '*' if k.endswith('.') else k for k in INFERENCE_OVERRIDES)}. "
            "To evaluate another model, train it in its own --workdir.",
            2,
        )
    try:
        config_utils.check_override_keys(config_utils.from_dict(saved), keys)
    except config_utils.ConfigError as e:
        fail(str(e), 2)
    return f"--config={_WORKDIR_CONFIG_FILE}:{workdir}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl ``flags_parser``: checks ``--config`` and its ``--config.<field>`` names, then
    parses ``argv``.

    The config file is loaded here first, so that a missing or broken one is one ``error:``
    line rather than absl's traceback. ``--mode eval|sample --workdir W`` without ``--config``
    uses W's ``config.json`` (with the overrides :data:`INFERENCE_OVERRIDES` allows).

    Every call starts from the flags' defaults, so calling the program twice in one process
    (tests, a notebook) does not carry flags over from the first call.
    """
    keys = config_utils.override_keys(argv)
    path = _flag_value(argv, "config")
    workdir = _flag_value(argv, "workdir")
    if path is not None:
        try:
            config_utils.check_override_keys(config_utils.load_config_file(path), keys)
        except config_utils.ConfigError as e:
            fail(str(e), 2)
    elif _flag_value(argv, "mode") in ("eval", "sample") and workdir:
        # Before the overrides: absl defines the --config.<field> flags when --config is parsed.
        argv = [argv[0], _workdir_config_flag(workdir, keys), *argv[1:]]
    elif keys:
        fail(
            "--config.<field> overrides need --config <file> (or, with --mode eval|sample, "
            "--workdir of a trained run): e.g. --config configs/mnist.py "
            "--config.batch_size=256.",
            2,
        )
    # config_flags defines a flag per --config.<field> each time --config is parsed: drop the
    # ones of an earlier call, and put every other flag back to its default.
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # e.g. --config.batch_size=abc: one line, no traceback
        fail(f"{e}. See python train.py --helpfull.", 2)


def resolve_config(
    config: ml_collections.ConfigDict | None, workdir: str | None, mode: str
) -> ml_collections.ConfigDict:
    """``--config`` (with overrides), or for ``eval``/``sample`` the workdir's ``config.json``.

    Raises ``workdir_files.DamagedFileError`` for a damaged ``config.json``.
    """
    if config is None and mode != "train" and workdir:
        if (Path(workdir) / workdir_files.CONFIG).exists():
            config = workdir_config.get_config(workdir)
    if config is None:
        fail(
            "--config is required (e.g. --config configs/mnist.py); with --mode eval|sample, "
            "--workdir of a trained run also works.",
            2,
        )
    config.lock()  # a misspelt field assigned later fails instead of being ignored
    return config


class _DropUnpreparedNotice(logging.logging.Filter):
    """Hides tensorflow-datasets' "Variant folder <data_dir>/<name>/<version> has no
    dataset_info.json": the dataset is not prepared there, which jaxvae then prepares, or
    reports in its own words."""

    def filter(self, record) -> bool:
        return not (
            "tensorflow_datasets" in record.pathname
            and str(record.msg).startswith("Variant folder")
        )


def quiet_logging() -> None:
    """WARNING and above only, unless ``--verbosity`` was given (orbax/tfds log every step)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_DropUnpreparedNotice())
    checkpointing.hide_orbax_logs()


def _out_of_memory_message(e: Exception, mode: str) -> str:
    """One line for XLA's ``RESOURCE_EXHAUSTED``: what ran out and which fields size it."""
    cause = str(e).strip().splitlines()[0]
    resume = (
        " Run the same command with smaller values: training resumes from the latest "
        "checkpoint (a step whose evaluation ran out of memory is saved first)."
        if mode == "train"
        else ""
    )
    return (
        f"the {jax.default_backend().upper()} ran out of memory ({cause}). Lower what sizes the "
        "programs: --config.batch_size (training), --config.eval.batch_size or "
        "--config.eval.memory_mb (evaluation)." + resume
    )


def _note_training_run(workdir: str, mode: str) -> None:
    """Says so when a training run holds the workdir: eval and sample only read checkpoints,
    which they may do meanwhile (the latest one may be newer by the time they finish)."""
    try:
        holder = workdir_lock.read_holder(workdir)
    except workdir_lock.WorkdirBusyError:  # an unreadable lock: training reports it
        return
    if holder is not None and holder.alive() is not False and jax.process_index() == 0:
        print(
            f"note: {workdir} is being trained by another run ({holder.describe()}); this "
            f"--mode {mode} reads its checkpoints as they are now.",
            file=sys.stderr,
            flush=True,
        )


def main(
    config: ml_collections.ConfigDict | None,
    workdir: str | None,
    mode: str,
    checkpoint: str,
    processes: distributed.Options | None = None,
) -> None:
    """Runs ``mode`` (train | eval | sample) and prints its result.

    First joins JAX's distributed runtime when this is one of several processes
    (:mod:`jaxvae.distributed`; ``processes`` holds the process flags).

    Exit status: 0 done; 1 a user error (one ``error:`` line); 2 bad flags; 128 + signal
    number when SIGTERM / Ctrl-C stopped training after saving a checkpoint (143 / 130).
    """
    try:
        distributed.initialize(processes)  # before anything queries devices
    except distributed.DistributedError as e:
        fail(str(e), 2)
    try:
        config = resolve_config(config, workdir, mode)
        workdir = workdir or str(Path("runs") / config.name)
        # Processes started with different commands must not start one program.
        distributed.check_same_settings(
            {
                "jaxvae version": jaxvae.__version__,
                "--mode": mode,
                "--workdir": workdir,
                "--checkpoint": checkpoint,
                "config": config_utils.to_dict(config),
            }
        )
        if mode == "train":
            out = json.dumps(train_lib.train_and_evaluate(config, workdir), indent=2)
        elif mode == "eval":
            _note_training_run(workdir, mode)
            out = json.dumps(inference.evaluate_workdir(config, workdir, checkpoint), indent=2)
        else:
            _note_training_run(workdir, mode)
            out = "\n".join(map(str, inference.sample_workdir(config, workdir, checkpoint)))
        if jax.process_index() == 0:  # one copy of the result, not one per process
            print(out)
    except checkpointing.CheckpointWriteError as e:
        fail(str(e), at_once=True)  # orbax's threads of the failed save would hold the exit
    except checkpointing.CheckpointError as e:
        # The other reads of the checkpoint fail too, as asyncio tasks whose exceptions asyncio
        # would log at exit as tracebacks after this message.
        logging.logging.getLogger("asyncio").disabled = True
        fail(str(e))
    except USER_ERRORS as e:
        fail(str(e))
    except jax.errors.JaxRuntimeError as e:
        if not train_lib.is_out_of_memory(e):
            raise
        # At once, as for Ctrl-C: every `finally` (pending checkpoint saves, the lock) has run.
        fail(_out_of_memory_message(e, mode), at_once=True)
    except preemption.Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # outside the training loop (set-up, --mode eval|sample)
        # At once: the interpreter's shutdown with a computation still running on XLA's
        # threads (Ctrl-C during an evaluation) crashed after this message (exit 139).
        # Nothing is pending: every `finally` (the workdir's lock) has run.
        fail("interrupted; nothing was saved.", 130, at_once=True)


__all__ = [
    "INFERENCE_OVERRIDES",
    "USER_ERRORS",
    "fail",
    "main",
    "parse_flags",
    "quiet_logging",
    "resolve_config",
]
