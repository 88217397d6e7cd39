"""Train, evaluate or sample a convolutional VAE.

  python train.py --config configs/mnist.py [--workdir DIR] [--config.batch_size=256]
  python train.py --config configs/mnist.py --mode eval [--checkpoint best]
  python train.py --config configs/mnist.py --mode sample

The default workdir is ``runs/<config.name>``. Training resumes automatically when the workdir
holds a checkpoint. Any config field can be overridden as ``--config.<field>=<value>``; an
unknown field is rejected with the list of valid ones. With ``--mode eval|sample`` and no
``--config``, the workdir's ``config.json`` is used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    # Before jax is imported: restart with huge-page malloc where it helps (see
    # jaxvae/host_memory.py: about 1.2-1.3x on the CPU training step; JAXVAE_HUGEPAGES=0 opts out).
    from jaxvae import host_memory

    host_memory.reexec_with_hugepages()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxvae import checkpointing, config_utils, input_pipeline, train_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config.name>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "latest", ["latest", "best"], "Checkpoint used by --mode eval|sample."
)

# Errors a user can fix; reported as one message and exit status 1, without a traceback.
USER_ERRORS = (
    config_utils.ConfigError,
    input_pipeline.DatasetNotFoundError,
    input_pipeline.CorruptDatasetFileError,
    train_lib.WorkdirMismatchError,
    checkpointing.CheckpointError,
)


def fail(message: str, status: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_overrides(argv: list[str]) -> None:
    """Rejects ``--config.<unknown>`` before absl parses it (its error lists no valid keys)."""
    keys = config_utils.override_keys(argv)
    if not keys:
        return
    path = _config_path(argv)
    if path is None:
        fail("--config.<field> overrides need --config <file>.", 2)
    try:
        config_utils.check_override_keys(config_utils.load_config_file(path), keys)
    except config_utils.ConfigError as e:
        fail(str(e), 2)


def resolve_config(workdir: str | None):
    """The config of this invocation: ``--config`` with overrides, or the workdir's config.json."""
    if _CONFIG.value is not None:
        return _CONFIG.value
    if _MODE.value != "train" and workdir and (Path(workdir) / "config.json").exists():
        config = config_utils.from_dict(json.loads((Path(workdir) / "config.json").read_text()))
        config.lock()
        return config
    fail(
        "--config is required (e.g. --config configs/mnist.py); with --mode eval|sample, "
        "--workdir of a trained run also works.",
        2,
    )


class _DropNoise(logging.logging.Filter):
    """Hides orbax warnings about what we do on purpose (metric-less saves, read-only reads)."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(n in message for n in ("did not provide metrics", "is read only"))


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        # absl would print every INFO line of orbax/tfds; --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_DropNoise())
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags look like --config.batch_size=256.", 2)
    config = resolve_config(_WORKDIR.value)
    config.lock()  # a misspelt field assigned later fails instead of being ignored
    workdir = _WORKDIR.value or str(Path("runs") / config.name)
    try:
        if _MODE.value == "train":
            results = train_lib.train_and_evaluate(config, workdir)
            print(json.dumps(results, indent=2))
        elif _MODE.value == "eval":
            results = train_lib.evaluate_workdir(config, workdir, _CHECKPOINT.value)
            print(json.dumps(results, indent=2))
        else:
            for path in train_lib.sample_workdir(config, workdir, _CHECKPOINT.value):
                print(path)
    except USER_ERRORS as e:
        fail(str(e))


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    check_overrides(argv)
    saved, sys.argv = sys.argv, argv  # config_flags reads sys.argv for --config.<field>
    try:
        app.run(main, argv)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    run()
