"""Joining JAX's distributed runtime when ``train.py`` is one of several processes.

Several processes (hosts of a TPU pod slice, SLURM tasks, ``mpirun`` ranks, or processes
started by hand) form one JAX program only after each has called
``jax.distributed.initialize`` *before* its first device query. :func:`initialize` decides
whether to, with one rule that :func:`plan` implements (pure, so it is tested on its own):

1. ``--num_processes=1`` (or ``JAX_NUM_PROCESSES=1``): a plain single-process run, whatever
   the environment says (e.g. one process inside a SLURM allocation of several tasks).
2. Any of ``--coordinator_address``, ``--num_processes``, ``--process_id`` given (flags, or the
   environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
   a flag wins): join with those values. What is missing is filled in by JAX from a detected
   cluster (below); with no cluster, all three are needed and the error names the missing ones.
3. Nothing given: join with no arguments, letting JAX detect everything, exactly when a
   launcher of several processes is detected:

   - SLURM: a task of ``srun`` (JAX's variables ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``,
     ``SLURM_PROCID``, ``SLURM_LOCALID`` are set) with ``SLURM_NTASKS`` > 1. The batch script
     itself (no ``srun``) has no ``SLURM_STEP_NODELIST`` and runs alone.
   - Open MPI: ``OMPI_COMM_WORLD_SIZE`` > 1 (``mpirun -n N``, N > 1).
   - A Cloud TPU VM (JAX found TPU chips and libtpu when it was imported): JAX reads the
     slice's workers from the TPU metadata. A one-host TPU VM forms a one-process runtime,
     which is harmless and what JAX recommends on TPU.

   Otherwise (a laptop, one GPU machine, a notebook) nothing is called: the run is unchanged.

The heartbeat timeout (``--heartbeat_timeout``, default :data:`DEFAULT_HEARTBEAT_TIMEOUT_S`)
bounds how long the survivors of a dead process wait: JAX's coordination service declares a
process dead when it has sent no heartbeat for that long and then *terminates every other
process* from its C++ runtime (exit by SIGABRT, status 134) with the fatal log line
``Terminating process because the JAX distributed service detected fatal errors. This most
likely indicates that another task died``. JAX's own default, 100 s, is long for a training job.

Joining is bounded as well: a process whose peers have not all joined after ``--join_timeout``
seconds (default :data:`DEFAULT_JOIN_TIMEOUT_S`) stops with one ``error:`` line and status 1,
from a watchdog thread (JAX itself would abort, with a C++ stack dump, when its
``initialization_timeout`` passes; it is set 30 s later). Once joined, the processes compare
what they were started with (:func:`check_same_settings`) before anything is written.

On CPU, cross-process collectives need an implementation: ``gloo`` is selected (before
``initialize``) when the backend will be the CPU, i.e. ``JAX_PLATFORMS`` starts with ``cpu``,
or no accelerator plugin is installed; a value set by the user (e.g. ``mpi``) is kept.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from jaxvae import backend

DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_JOIN_TIMEOUT_S = 300
# JAX's own deadline for joining comes this much after --join_timeout: when it passes, JAX's
# C++ runtime aborts the process with a stack dump; the watchdog's one line must come first.
_JAX_JOIN_GRACE_S = 30
ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"  # also read by jax.distributed itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


class DistributedError(ValueError):
    """The process flags or environment are inconsistent; the message says what to pass."""


@dataclasses.dataclass(frozen=True)
class Options:
    """The process flags of ``train.py``; ``None`` means "not given" (environment, then JAX)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S
    join_timeout_s: int = DEFAULT_JOIN_TIMEOUT_S


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`initialize` does: join or not, why, and the arguments for JAX."""

    join: bool
    reason: str  # for the join line, e.g. "SLURM, 4 tasks" or "--num_processes"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer.") from None


def _with_environment(options: Options, environ: Mapping[str, str]) -> Options:
    """``options`` with every value not given as a flag taken from the environment."""
    return dataclasses.replace(
        options,
        coordinator_address=options.coordinator_address
        or environ.get(ENV_COORDINATOR_ADDRESS)
        or None,
        num_processes=options.num_processes
        if options.num_processes is not None
        else _env_int(environ, ENV_NUM_PROCESSES),
        process_id=options.process_id
        if options.process_id is not None
        else _env_int(environ, ENV_PROCESS_ID),
    )


def detect_cluster(environ: Mapping[str, str], on_cloud_tpu: bool) -> str | None:
    """A launcher of several processes JAX can read, as a short description; else None."""
    if all(environ.get(v) for v in _SLURM_VARS) and (_env_int(environ, "SLURM_NTASKS") or 0) > 1:
        return f"SLURM, {environ['SLURM_NTASKS']} tasks"
    if (_env_int(environ, "OMPI_COMM_WORLD_SIZE") or 0) > 1:
        return f"Open MPI, {environ['OMPI_COMM_WORLD_SIZE']} ranks"
    if on_cloud_tpu:
        return "Cloud TPU VM"
    return None


def _check(o: Options) -> None:
    if o.heartbeat_timeout_s < 1:
        raise DistributedError(f"--heartbeat_timeout={o.heartbeat_timeout_s} must be >= 1 s.")
    if o.join_timeout_s < 1:
        raise DistributedError(f"--join_timeout={o.join_timeout_s} must be >= 1 s.")
    if o.num_processes is not None and o.num_processes < 1:
        raise DistributedError(f"--num_processes={o.num_processes} must be >= 1.")
    n = o.num_processes
    if o.process_id is not None and not (0 <= o.process_id < (n if n is not None else 2**31)):
        raise DistributedError(
            f"--process_id={o.process_id} must be in [0, {n if n is not None else 'N'})."
        )
    if o.coordinator_address is not None and ":" not in o.coordinator_address:
        raise DistributedError(
            f"--coordinator_address={o.coordinator_address!r} must be host:port "
            "(the address of process 0, e.g. 10.0.0.2:1234)."
        )


def plan(options: Options, environ: Mapping[str, str], on_cloud_tpu: bool = False) -> Plan:
    """Applies the module's rule to the flags and environment; raises DistributedError."""
    o = _with_environment(options, environ)
    _check(o)
    heartbeat = {
        "heartbeat_timeout_seconds": o.heartbeat_timeout_s,
        "initialization_timeout": o.join_timeout_s + _JAX_JOIN_GRACE_S,
    }
    if o.num_processes == 1:
        return Plan(False, "--num_processes=1")
    cluster = detect_cluster(environ, on_cloud_tpu)
    given = {
        "coordinator_address": o.coordinator_address,
        "num_processes": o.num_processes,
        "process_id": o.process_id,
    }
    if any(v is not None for v in given.values()):
        missing = [f"--{k}" for k, v in given.items() if v is None]
        if missing and cluster is None:
            raise DistributedError(
                "several processes need --coordinator_address (host:port of process 0), "
                f"--num_processes and --process_id; missing: {', '.join(missing)} (or set "
                f"{ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})."
            )
        reason = "flags" + (f" and {cluster}" if missing else "")
        kwargs = {k: v for k, v in given.items() if v is not None}
        return Plan(True, reason, {**kwargs, **heartbeat})
    if cluster is not None:
        return Plan(True, cluster, heartbeat)
    return Plan(False, "no multi-process launcher detected")


def _on_cloud_tpu() -> bool:
    """JAX's own finding at import: TPU chips and libtpu on this VM (private, so guarded)."""
    try:
        from jax._src import cloud_tpu_init  # noqa: PLC0415
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize(options: Options | None = None, environ: Mapping[str, str] | None = None) -> Plan:
    """Joins JAX's distributed runtime if the module's rule says so; returns the plan.

    Call before anything queries devices or computes. A joined process prints one line to
    stderr naming its index, the process count, the reason and the heartbeat timeout.
    Raises DistributedError for inconsistent flags (the message says what to pass).
    """
    import jax  # noqa: PLC0415 - after the caller's environment set-up

    environ = os.environ if environ is None else environ
    p = plan(options or Options(), environ, _on_cloud_tpu())
    if not p.join or jax.distributed.is_initialized():  # joined already: a second run
        return p
    on_cpu = not backend.accelerator_expected({"JAX_PLATFORMS": jax.config.jax_platforms or ""})
    if on_cpu and not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    accepted = inspect.signature(jax.distributed.initialize).parameters
    kwargs = {k: v for k, v in p.kwargs.items() if k in accepted}  # older jax: fewer timeouts
    join_timeout_s = p.kwargs["initialization_timeout"] - _JAX_JOIN_GRACE_S
    watchdog = _give_up_after(join_timeout_s, _never_joined(p, join_timeout_s))
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # JAX could not fill in what was not given
        raise DistributedError(
            f"jax.distributed.initialize failed ({e}); pass --coordinator_address, "
            "--num_processes and --process_id."
        ) from e
    finally:
        watchdog.cancel()
    print(
        f"Process {jax.process_index()} of {jax.process_count()} joined JAX's distributed "
        f"runtime ({p.reason}). If a process dies, JAX stops the others within about "
        f"{p.kwargs['heartbeat_timeout_seconds']} s ('Terminating process because the "
        "JAX distributed service detected fatal errors').",
        file=sys.stderr,
        flush=True,
    )
    return p


def _never_joined(p: Plan, seconds: int) -> str:
    """What to say when the processes of ``p`` have not all joined after ``seconds``."""
    n, i = p.kwargs.get("num_processes"), p.kwargs.get("process_id")
    where = p.kwargs.get("coordinator_address", "the coordinator")
    if i == 0:
        return (
            f"process 0 of {n} waited {seconds} s (--join_timeout) for the other processes to "
            f"join it at {where}; nothing was written. Start all {n} processes with the same "
            f"--coordinator_address (--process_id 0 to {n - 1}), or raise --join_timeout."
        )
    if i is not None:
        return (
            f"process {i} of {n} could not join process 0 at {where} within {seconds} s "
            "(--join_timeout); nothing was written. Start process 0 (it listens at that "
            "address), fix --coordinator_address, or raise --join_timeout."
        )
    return (
        f"the processes of this run ({p.reason}) did not all join JAX's distributed runtime "
        f"within {seconds} s (--join_timeout); nothing was written. Check that every process "
        "started, or raise --join_timeout."
    )


def _give_up_after(seconds: float, message: str) -> threading.Timer:
    """Ends the process with ``error: message`` (status 1) unless cancelled within ``seconds``.

    ``jax.distributed.initialize`` blocks in C++ (without the GIL) while it waits for the
    other processes, and JAX ends a wait that times out with an abort, not an exception.
    """

    def give_up() -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    return timer


def sync_processes(name: str) -> None:
    """Returns once every process has called it with ``name`` (at once with one process).

    Processes that branch on what they read from a shared workdir (does ``checkpoints/``
    exist?) must all read before any of them writes, or they take different branches and
    their collectives (orbax's barriers among them) no longer pair up.
    """
    import jax  # noqa: PLC0415

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def allgather_texts(text: str) -> list[str]:
    """Every process's ``text``, in process order (``[text]`` with one process)."""
    import jax  # noqa: PLC0415

    if jax.process_count() == 1:
        return [text]
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    data = np.frombuffer(text.encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    padded = np.zeros(max(1, int(sizes.max())), np.uint8)  # one length for every process
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(row[:n]).decode() for row, n in zip(rows, sizes.ravel(), strict=True)]


class ProcessMismatchError(RuntimeError):
    """The processes of one run were started with different settings; nothing was written."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_settings(settings: Mapping[str, Any]) -> None:
    """Raises :class:`ProcessMismatchError` on every process unless all hold equal ``settings``.

    ``settings`` (JSON-ready, nested dicts allowed) is what must agree for the processes to
    run one program: the resolved config, the mode, the workdir, the jaxvae version. The
    message names each field that differs and its value on each process.
    """
    texts = allgather_texts(json.dumps(_flatten(settings), sort_keys=True))
    if len(set(texts)) == 1:
        return
    every = [json.loads(t) for t in texts]
    diffs = []
    for field in sorted(set().union(*every)):
        where: dict[str, list[int]] = {}  # value -> processes holding it
        for i, values in enumerate(every):
            where.setdefault(json.dumps(values.get(field, "<missing>")), []).append(i)
        if len(where) > 1:
            diffs.append(
                f"{field}: "
                + ", ".join(
                    f"{v} on process{'es' if len(p) > 1 else ''} {', '.join(map(str, p))}"
                    for v, p in where.items()
                )
            )
    raise ProcessMismatchError(
        f"the {len(texts)} processes of this run were started with different settings, so they "
        f"would not run one program: {'; '.join(diffs[:8])}{'; ...' if len(diffs) > 8 else ''}. "
        "Nothing was written; start every process with the same command (and jaxvae version)."
    )


__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT_S",
    "DEFAULT_JOIN_TIMEOUT_S",
    "DistributedError",
    "Options",
    "Plan",
    "ProcessMismatchError",
    "allgather_texts",
    "check_same_settings",
    "detect_cluster",
    "initialize",
    "plan",
    "sync_processes",
]
