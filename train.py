"""Train, evaluate or sample a convolutional VAE.

  python train.py --config configs/mnist.py [--workdir DIR] [--config.batch_size=256]
  python train.py --config configs/mnist.py --mode eval [--checkpoint best]
  python train.py --config configs/mnist.py --mode sample
  python train.py --mode eval --workdir runs/mnist --config.eval.iwae_samples=5000

The default workdir is ``runs/<config.name>``. Training resumes automatically when the workdir
holds a checkpoint. Any config field can be overridden as ``--config.<field>=<value>``; an
unknown field is rejected with the list of valid ones. With ``--mode eval|sample`` and no
``--config``, the workdir's ``config.json`` is used (``--config.eval.*`` and a few data
fields may still be overridden: ``jaxvae.cli.INFERENCE_OVERRIDES``). The work is done in
``jaxvae.cli``, ``jaxvae.train_lib`` and ``jaxvae.inference``. Several processes
(``--coordinator_address host:port --num_processes N --process_id i``, or srun / mpirun / a
TPU slice, detected) join JAX's distributed runtime first: ``jaxvae.distributed``.
"""

from __future__ import annotations

if __name__ == "__main__":
    # Before jax is imported: restart with huge-page malloc where it helps (see
    # jaxvae/host_memory.py; JAXVAE_HUGEPAGES=0 opts out).
    from jaxvae import host_memory

    host_memory.reexec_with_hugepages()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxvae import cli, distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config.name>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "latest", ["latest", "best"], "Checkpoint used by --mode eval|sample."
)
# Several processes (jaxvae/distributed.py): SLURM, Open MPI and TPU slices need none of these.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (1: never join).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout",
    distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
    "Seconds without a heartbeat after which a process counts as dead and the run stops.",
)
_JOIN_TIMEOUT = flags.DEFINE_integer(
    "join_timeout",
    distributed.DEFAULT_JOIN_TIMEOUT_S,
    "Seconds a process waits for all processes of the run to join; then it stops (exit 1).",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --config.x=1.")
    cli.quiet_logging()
    processes = distributed.Options(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        _HEARTBEAT.value,
        _JOIN_TIMEOUT.value,
    )
    cli.main(_CONFIG.value, _WORKDIR.value, _MODE.value, _CHECKPOINT.value, processes=processes)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
