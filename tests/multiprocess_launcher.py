"""Runs ``python train.py ARGS`` in this process on virtual CPU devices and tfds mock data.

A helper of ``tests/test_multiprocess.py``, started as a subprocess once per simulated host:

  python tests/multiprocess_launcher.py --config configs/tiny.py --num_processes 2 ...

Environment: ``JAXVAE_TEST_CPU_DEVICES`` (devices of this process, default 4),
``JAXVAE_TEST_MOCK_EXAMPLES`` (mock split size, default 40), ``JAXVAE_TEST_SIGTERM_AT_CHECK``
(this process sends itself SIGTERM before the training loop's N-th stop check, see
:func:`sigterm_at_check`: a scheduler's preemption notice at a known point, without polling
the log). Every process generates the same mock examples (tfds
seeds them by index), so all processes see identical data.

``python tests/multiprocess_launcher.py --serve`` is the tests' zygote (:class:`Zygote` starts
it): it imports what ``train.py`` imports once, then forks one such process per request, so
that no run pays the interpreter's start-up and ~6 CPU-s of imports (TensorFlow, JAX, Flax,
orbax) again. A forked run is a real process (its own pid, signals, exit code, log) that goes
on exactly as a started one from :func:`main`; JAX and TensorFlow have only been imported, not
initialised, before the fork. (``ps`` shows the runs with the zygote's command line.)

The in-process tests use its tfds helpers too (:func:`mock_data`, :func:`no_network`), so that
they and the forked runs see datasets the same way.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# XLA_FLAGS of every test process (conftest.py) and of these subprocesses: the tests compile
# hundreds of small programs and run each briefly, so LLVM's optimisations cost more compile
# time than they save at run time (whole suite: 1,654 -> 1,220 CPU-seconds), and XLA's older
# loop emitters compile a small 8-device step about 3x faster than the fusion emitters
# (0.6-1.1 s vs 2.7-3.1 s). No fast-math: every comparison holds at unchanged tolerances
# (tests/test_vamp.py compares exactly-zero gradients, pure rounding, to the tree's float32
# noise floor).
FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)
_REDIRECTING = ("_mock_open", "_mock_fn", "_mock_fn_2_args", "_mock_glob", "_mock_walk")


@contextlib.contextmanager
def mock_data(**options) -> Iterator[None]:
    """``tfds.testing.mock_data(**options)`` whose datasets count as prepared, as a dataset
    that a user downloaded or prepared from ``config.data.manual_dir`` does: tfds's mock leaves
    ``is_prepared()`` False and relies on its ``download_and_prepare`` doing nothing, which
    jaxvae calls only where it may download (not for drawing samples or loading a model)."""
    from unittest import mock  # noqa: PLC0415

    import tensorflow_datasets as tfds  # noqa: PLC0415 - never when pytest imports this file

    prepared = mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(**options), prepared:
        yield


def no_network(monkeypatch, why: str) -> list[str]:
    """Every HTTP request (tfds downloads with ``requests``) fails with ``why``; returns the
    list the requested URLs are appended to."""
    import requests  # noqa: PLC0415

    urls = []

    def request(self, method, url, *args, **kwargs):
        urls.append(url)
        raise requests.ConnectionError(why)

    monkeypatch.setattr(requests.Session, "request", request)
    return urls


def confine_mock_fs_to_its_thread() -> None:
    """Makes tfds's mock file system redirect only the thread that entered it.

    While a mocked ``as_dataset`` runs, ``tfds.testing.mock_data`` redirects every ``epath`` /
    ``tf.io.gfile`` access *of the process* to a temporary folder; an orbax checkpoint being
    written meanwhile by a background thread then writes into (and fails in) that folder.
    """
    from tensorflow_datasets.testing import test_utils  # noqa: PLC0415

    enter = test_utils.MockFs.__enter__

    def owned_enter(self):
        self.owner_thread = threading.get_ident()
        return enter(self)

    def passthrough(redirect):
        def fn(self, original_fn, *args, **kwargs):
            if getattr(self, "owner_thread", None) != threading.get_ident():
                return original_fn(*args, **kwargs)
            return redirect(self, original_fn, *args, **kwargs)

        return fn

    test_utils.MockFs.__enter__ = owned_enter
    for name in _REDIRECTING:
        setattr(test_utils.MockFs, name, passthrough(getattr(test_utils.MockFs, name)))


def collect_less() -> None:
    """Makes Python's cyclic garbage collector run far less often in this test process.

    Tracing and compiling hundreds of programs allocates millions of short-lived objects, and
    with the default thresholds (700, 10, 10) the collector keeps walking JAX's, TensorFlow's
    and Flax's long-lived objects: measured on 2 cores, 10-15 % of a tiny ``train.py`` run
    (9.1-10.0 vs 10.3-11.9 CPU-s) and of the in-process tests (test_train_step, test_vamp and
    test_train in one process: 232 vs 268 CPU-s). Everything imported so far is frozen (never
    examined again); later garbage is still collected, every 50,000 allocations instead of 700.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def hold_workdir_lock(workdir: Path) -> subprocess.Popen:
    """A live process (not this one) holding ``workdir``'s lock, as a training run would.

    The caller kills it (``.kill()``: SIGKILL, so the lock stays behind, stale).
    """
    code = (
        "import sys, time; from jaxvae import workdir_lock; "
        "workdir_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True, env=env
    )
    if proc.stdout.readline().strip() != "held":
        proc.kill()
        raise RuntimeError(f"the lock holder of {workdir} did not start")
    return proc


def sigterm_at_check(check: int) -> None:
    """Makes this process send itself SIGTERM right before the loop's ``check``-th call of
    :meth:`jaxvae.preemption.StopSignal.reached`: after training step ``check`` when no
    evaluation came before (an evaluation asks before each of its batches but the first).

    The signal goes through the real path (the installed handler, or JAX's preemption notifier
    in a multi-process run); only its timing is fixed.
    """
    from jaxvae import preemption  # noqa: PLC0415

    reached = preemption.StopSignal.reached

    def signalling_reached(self) -> bool:
        if self.checks + 1 == check:
            os.kill(os.getpid(), signal.SIGTERM)
        return reached(self)

    preemption.StopSignal.reached = signalling_reached


# A test process's cluster variables must not leak into the runs (they would join a cluster).
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def device_env(devices: int) -> dict[str, str]:
    """The variables that give a run ``devices`` virtual CPU devices."""
    return {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
        "JAXVAE_TEST_CPU_DEVICES": str(devices),
    }


def run_env(cache_dir: Path) -> dict[str, str]:
    """The environment of a launcher run: this process's without its cluster variables, CPU
    only (4 devices: ``device_env`` changes that), no huge-page restart, compiling with
    ``FAST_COMPILE`` into the test run's cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
    env.update(
        device_env(4),
        JAX_PLATFORMS="cpu",
        JAXVAE_HUGEPAGES="0",
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


# Environment variables that JAX and TensorFlow read when imported: a forked run must have the
# zygote's values (XLA_FLAGS is read later, when the first backend is made).
_READ_AT_IMPORT = ("JAX_", "TF_", "CUDA_VISIBLE_DEVICES")


def _read_at_import(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_READ_AT_IMPORT)}


def _serve() -> None:
    """The zygote's loop; returns only in a forked child, set up as its request asks.

    stdin: one JSON request per line, ``{"argv", "env", "cwd", "log"}`` (start a run) or
    ``{"pid", "signal"}`` (signal a child not yet reaped, so never a recycled pid). stdout:
    ``ready``, then ``started PID`` per run and ``exited PID CODE`` (``Popen.returncode``'s
    convention: ``-N`` for signal N). Ends, killing its children, when stdin closes.
    """
    sys.path.insert(0, str(ROOT))
    import absl.app  # noqa: F401, PLC0415 - what train.py and the launcher import, once
    import jax  # noqa: F401, PLC0415
    import ml_collections.config_flags  # noqa: F401, PLC0415
    import tensorflow  # noqa: F401, PLC0415 - tfds imports it lazily, at the first dataset
    import tensorflow_datasets.testing  # noqa: F401, PLC0415

    from jaxvae import cli, distributed, train_lib  # noqa: F401, PLC0415

    imported_env = _read_at_import(os.environ)
    # Ctrl-C reaches the whole process group: the runs stop on it as they would, and the zygote
    # stays to reap them until pytest closes its stdin.
    on_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    collect_less()  # frozen in the zygote: the children share these pages untouched
    children: set[int] = set()
    pending, stdin = b"", sys.stdin.fileno()

    def answer(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    answer("ready")
    while True:
        readable, _, _ = select.select([stdin], [], [], 0.05)
        chunk = os.read(stdin, 65536) if readable else b""
        if readable and not chunk:  # the tests are done: no orphans left behind
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            for pid in children:
                os.waitpid(pid, 0)
            sys.exit(0)
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if "signal" in request:
                if request["pid"] in children:
                    os.kill(request["pid"], request["signal"])
                continue
            if _read_at_import(request["env"]) != imported_env:
                raise ValueError(
                    f"a forked run needs the zygote's {_READ_AT_IMPORT} variables "
                    f"{imported_env}, got {_read_at_import(request['env'])}"
                )
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGINT, on_sigint)  # as the zygote started: Python's own
                _become(request)
                return
            children.add(pid)
            answer(f"started {pid}")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            answer(f"exited {pid} {os.waitstatus_to_exitcode(status)}")


def _become(request: dict) -> None:
    """In a forked child: the run's stdin, log, directory, environment and arguments."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])


class Zygote:
    """The test side of ``--serve``: starts runs as forks of one prepared process.

    ``env`` is the environment the zygote imports with; every run's environment must agree
    with it on the variables read at import (``_READ_AT_IMPORT``). Off Linux (macOS forbids
    forking a process that has loaded some system frameworks) each run is a plain subprocess.
    """

    def __init__(self, env: Mapping[str, str]):
        self.env = dict(env)
        self._forks = sys.platform == "linux"
        if not self._forks:
            return
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._exited: dict[int, int] = {}
        self._started: list[int] = []
        self._closed = False
        self._changed = threading.Condition()
        self._lock = threading.Lock()  # one request and its answer at a time
        if self._proc.stdout.readline().strip() != "ready":
            self._proc.kill()
            raise RuntimeError("the test zygote did not start (its error is above)")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            kind, pid, *code = line.split()
            with self._changed:
                if kind == "started":
                    self._started.append(int(pid))
                else:
                    self._exited[int(pid)] = int(code[0])
                self._changed.notify_all()
        with self._changed:  # the zygote ended: nothing will exit any more
            self._closed = True
            self._changed.notify_all()

    def _send(self, request: dict) -> None:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()

    def start(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path
    ) -> ForkedRun | subprocess.Popen:
        """Forks ``argv`` (``[python, launcher, *args]``: the launcher's ``main`` runs)."""
        if not self._forks:
            with log.open("a") as out:
                return subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=out, stderr=out)
        with self._lock, self._changed:
            self._send({"argv": list(argv[1:]), "env": dict(env), "cwd": str(cwd), "log": str(log)})
            if not self._changed.wait_for(lambda: self._started or self._closed, 60):
                raise RuntimeError("the test zygote did not fork")
            if not self._started:
                raise RuntimeError(f"the test zygote ended (exit {self._proc.wait()})")
            return ForkedRun(self, self._started.pop())

    def close(self) -> None:
        """Kills the runs still going and ends the zygote."""
        if not self._forks:
            return
        self._proc.stdin.close()
        self._proc.wait(timeout=60)

    def returncode(self, pid: int) -> int | None:
        with self._changed:
            return self._exited.get(pid)

    def wait(self, pid: int, timeout: float | None) -> int:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exited or self._closed, timeout)
            if pid in self._exited:
                return self._exited[pid]
            if self._closed:
                raise RuntimeError(f"the test zygote ended before its run {pid}")
            raise subprocess.TimeoutExpired(f"forked run {pid}", timeout)

    def send_signal(self, pid: int, sig: int) -> None:
        """Signals run ``pid`` unless it has been reaped (its pid may be another's by then)."""
        with self._lock:
            self._send({"pid": pid, "signal": int(sig)})


class ForkedRun:
    """A run forked by a :class:`Zygote`: what the tests use of ``subprocess.Popen``."""

    def __init__(self, zygote: Zygote, pid: int):
        self._zygote, self.pid = zygote, pid

    def poll(self) -> int | None:
        return self._zygote.returncode(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        return self._zygote.wait(self.pid, timeout)

    def send_signal(self, sig: int) -> None:
        self._zygote.send_signal(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def main() -> None:
    """Sets the device count, enters tfds's mock data and runs train.py as ``__main__``."""
    import jax  # noqa: PLC0415 - only in the subprocess, never when pytest imports this file

    jax.config.update("jax_num_cpu_devices", int(os.environ.get("JAXVAE_TEST_CPU_DEVICES", "4")))
    sys.path.insert(0, str(ROOT))
    if "JAXVAE_TEST_SIGTERM_AT_CHECK" in os.environ:
        sigterm_at_check(int(os.environ["JAXVAE_TEST_SIGTERM_AT_CHECK"]))
    confine_mock_fs_to_its_thread()
    collect_less()
    num_examples = int(os.environ.get("JAXVAE_TEST_MOCK_EXAMPLES", "40"))
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    with mock_data(num_examples=num_examples):
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()  # returns in a forked run only
    main()
