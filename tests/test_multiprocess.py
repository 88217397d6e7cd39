"""``train.py`` as real subprocesses on CPU: several processes on JAX's distributed runtime,
SIGTERM in the middle of a run (one process, and one of two), a process that dies.

Each simulated host is a process running ``tests/multiprocess_launcher.py`` (``train.py`` on
tfds mock data) with 4 virtual CPU devices, forked by the test run's zygote (the ``zygote``
fixture: one process that has imported TensorFlow, JAX and jaxvae once), joined through
``--coordinator_address localhost:PORT --num_processes 2 --process_id i`` (gloo collectives).
The reference is one process with 8 devices. All runs use ``configs/tiny.py`` on tfds mock
data (identical in every process), dynamically binarized: each process draws the bits of the
whole global batch and keeps its rows, so 1 and 2 processes see the same batches.

The uninterrupted runs are module-scoped fixtures, each the reference of several tests: one
process (4 steps) and two processes (6 steps). The SIGTERM runs and their reruns must end
bit-identical to them; the run whose second process is killed starts from a copy of the
two-process workdir.

Speed: JAX writes its persistent compilation cache from process 0 only, and on CPU the cache
keys differ between processes, so process 1 compiles everything in every run. The subprocesses
therefore compile with LLVM's cheap settings (``FAST_COMPILE``), the same for every run
compared here.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
import pytest
from multiprocess_launcher import Zygote, device_env, mock_data

from jaxvae import checkpointing, config_utils, run_setup

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "multiprocess_launcher.py"
NUM_EXAMPLES = 40
HEARTBEAT_S = 10  # --heartbeat_timeout of the run whose process is killed (others: default)
STEPS = 6  # of the two-process runs
ONE_PROCESS_STEPS = 4  # the one-process runs: configs/tiny.py's (checked in `reference`)
# Two-process runs: checkpoints at 2, 4 and 6 (all kept), evaluations at 4 and 6.
TWO_PROCESS_ARGS = (f"--config.num_train_steps={STEPS}", "--config.keep_checkpoints=3")
SIGNAL_STEP = 1  # the step after which a process receives SIGTERM (no evaluation before it)
SIGTERM = {"JAXVAE_TEST_SIGTERM_AT_CHECK": str(SIGNAL_STEP)}
STOPPED = re.compile(
    r"Stopped by (\S+(?: \S+)*) at step (\d+) of (\d+): checkpoint saved in (\S+)\."
)
# See test_two_processes_equal_one_process (weight decay).
OVERRIDES = {"optimizer.weight_decay": 1.0}
COMMON_ARGS = ("--config", "configs/tiny.py", *(f"--config.{k}={v}" for k, v in OVERRIDES.items()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Run:
    """The processes of one ``train.py`` run, forked by ``zygote``; process ``i`` logs to
    ``<workdir>.log<i>``."""

    def __init__(
        self,
        workdir: Path,
        zygote: Zygote,
        *args: str,
        processes: int = 2,
        common: bool = True,
        own_args: Sequence[Sequence[str]] = (),
        own_env: Mapping[int, Mapping[str, str]] | None = None,
        started: Sequence[int] | None = None,
    ):
        """``common=False``: plain ``configs/tiny.py``, without this file's ``OVERRIDES``;
        ``own_args[i]``: more arguments for process ``i``; ``own_env[i]``: more environment
        variables for process ``i``; ``started``: the processes to start (default all;
        ``procs`` and ``logs`` hold those)."""
        started = range(processes) if started is None else started
        self.workdir, self.logs = workdir, [Path(f"{workdir}.log{i}") for i in started]
        port, devices = _free_port(), 8 // processes
        self.procs = []
        for i, log in zip(started, self.logs, strict=True):
            join = ("--coordinator_address", f"localhost:{port}", "--num_processes")
            join += (str(processes), "--process_id", str(i))
            head = COMMON_ARGS if common else COMMON_ARGS[:2]
            argv = [sys.executable, str(LAUNCHER), *head, "--workdir", str(workdir)]
            argv += [*args, *(own_args[i] if own_args else ()), *(join if processes > 1 else ())]
            env = {**zygote.env, **device_env(devices), **(own_env or {}).get(i, {})}
            env["JAXVAE_TEST_MOCK_EXAMPLES"] = str(NUM_EXAMPLES)
            log.write_text("")  # there to read from now on; the run appends to it
            self.procs.append(zygote.start(argv, env, ROOT, log))

    def log(self, i: int = 0) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait(self, timeout: float = 300) -> Run:
        """Waits for every process; fails with the logs' tails unless all exited with 0."""
        deadline = time.monotonic() + timeout
        try:
            codes = [p.wait(max(1.0, deadline - time.monotonic())) for p in self.procs]
        finally:
            self.kill()
        if any(codes):
            tails = "\n".join(f"--- process {i}\n{self.log(i)[-3000:]}" for i in range(len(codes)))
            pytest.fail(f"exit codes {codes}\n{tails}")
        return self

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _config():
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    config.update_from_flattened_dict(OVERRIDES)
    return config


def load_checkpoint(workdir: Path, step: int) -> tuple[dict, dict]:
    """(state as NumPy {params, batch_stats, opt_state, step}, data_iter) of a checkpoint."""
    with mock_data(num_examples=NUM_EXAMPLES):
        s = run_setup.setup(_config(), workdir, for_training=False)
    try:
        state, data_state = checkpointing.restore(s.manager, step, s.target)
    finally:
        checkpointing.close(s.manager)
    fields = ("params", "batch_stats", "opt_state", "step")
    return jax.device_get({k: getattr(state, k) for k in fields}), data_state


def metrics(workdir: Path) -> dict[int, dict]:
    """``metrics.jsonl`` by step; fails on a step written twice (a second writer)."""
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), f"metrics.jsonl has repeated steps {steps}"
    return {r["step"]: r for r in lines}


def assert_same_state(got: dict, want: dict) -> None:
    """Parameters, BatchNorm statistics and optimizer state equal to 1e-5."""
    np.testing.assert_equal(got["step"], want["step"])
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, zygote) -> Iterator[Run]:
    """One process, 8 devices, 4 steps (checkpoints at 2 and 4, evaluation at 4).

    Started, not awaited: it runs alongside ``two_processes`` (call ``.wait()`` before use).
    """
    tiny = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    assert tiny.num_train_steps == ONE_PROCESS_STEPS
    run = Run(tmp_path_factory.mktemp("one") / "wd", zygote, processes=1)
    yield run
    run.kill()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, zygote) -> Iterator[Run]:
    """Two processes x 4 devices, ``STEPS`` steps in one go; started, not awaited."""
    run = Run(tmp_path_factory.mktemp("two") / "wd", zygote, *TWO_PROCESS_ARGS)
    yield run
    run.kill()


def test_two_processes_equal_one_process(reference, two_processes):
    """2 processes x 4 devices == 1 process x 8 devices on the same global batches: the state
    at steps 2 and 4, the saved data position, the training loss and the evaluation at 4.

    The sums over devices run in another order (gloo across processes), so gradients agree
    only to rounding. The conv biases that feed a BatchNorm have a loss gradient of exactly
    zero, i.e. pure rounding noise, which Adam's normalisation turns into +-lr steps (see
    test_train_step); L2 weight decay (OVERRIDES) gives them a real gradient, so every leaf
    can be compared to 1e-5 (observed: below 1e-6).
    """
    workdir, reference = two_processes.wait().workdir, reference.wait().workdir
    for i in (0, 1):
        assert f"Process {i} of 2 joined JAX's distributed runtime (flags)" in two_processes.log(i)
    assert "Training tiny on 8 device(s) (cpu) in 2 processes" in two_processes.log(0)

    for step in (2, 4):
        got, got_iter = load_checkpoint(workdir, step)
        want, want_iter = load_checkpoint(reference, step)
        assert_same_state(got, want)
        # The saved iterator position is global: the same as one process's but the layout.
        assert {**got_iter, "process_count": 1} == want_iter and got_iter["process_count"] == 2
    got_metrics, want_metrics = metrics(workdir), metrics(reference)
    for key in ("train_loss", "test_neg_elbo", "test_nll_iwae"):
        np.testing.assert_allclose(got_metrics[4][key], want_metrics[4][key], rtol=1e-5)
    np.testing.assert_allclose(
        got_metrics[2]["train_loss"], want_metrics[2]["train_loss"], rtol=1e-5
    )

    # One writer: one metrics line per step, one TensorBoard file, the usual outputs; process
    # 0's workdir lock is gone.
    assert list(got_metrics) == [2, 4, 6]
    assert not (workdir / "jaxvae.lock").exists()
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
    results = json.loads((workdir / "results.json").read_text())
    assert (results["num_processes"], results["num_devices"], results["step"]) == (2, 8, STEPS)
    assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == STEPS
    for step in (4, STEPS):
        assert len(list((workdir / "images").glob(f"*_step{step:08d}.png"))) == 3


def _exit_codes(run: Run) -> list[int]:
    try:
        return [p.wait(timeout=240) for p in run.procs]
    finally:
        run.kill()


def _stopped_step(log: str, steps: int) -> int:
    match = STOPPED.search(log)
    assert match, log[-3000:]
    # "Run the same command ...", or "Its evaluation is still to do: it runs first when you run
    # the same command ..." when the stop came at an evaluation step.
    assert "the same command again to resume from there." in log and "Traceback" not in log
    assert int(match.group(3)) == steps
    return int(match.group(2))


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())


def test_sigterm_saves_the_step_and_resumes_exactly(reference, tmp_path_factory, zygote):
    """One process, SIGTERM after step 1 (the launcher sends it: no polling): exit code 143, a
    checkpoint of exactly step 1 (not a checkpoint step) and nothing else, the workdir lock
    gone; the same command again resumes and ends bit-identical to the uninterrupted
    ``reference``."""
    workdir = tmp_path_factory.mktemp("sigterm") / "wd"
    run = Run(workdir, zygote, processes=1, own_env={0: SIGTERM})
    codes = _exit_codes(run)
    text = run.log(0)
    assert codes == [128 + signal.SIGTERM], text[-3000:]
    assert "SIGTERM: stopping after the current step" in text
    assert _stopped_step(text, ONE_PROCESS_STEPS) == SIGNAL_STEP
    assert _checkpoints(workdir) == [SIGNAL_STEP]
    assert not (workdir / "results.json").exists()
    assert not (workdir / "jaxvae.lock").exists()  # the workdir is free for the rerun

    rerun = Run(workdir, zygote, processes=1).wait()  # the same command again
    assert f"Resumed from {workdir / 'checkpoints'} at step {SIGNAL_STEP}" in rerun.log(0)
    got, _ = load_checkpoint(workdir, ONE_PROCESS_STEPS)
    want, _ = load_checkpoint(reference.wait().workdir, ONE_PROCESS_STEPS)
    jax.tree.map(np.testing.assert_array_equal, got, want)  # bit-identical on CPU


def test_sigterm_during_the_last_evaluation_saves_the_step_and_resumes_with_it(
    reference, tmp_path_factory, zygote
):
    """One process, SIGTERM during the evaluation of the last step (after the first of its 5
    batches): the run stops there, not after the whole evaluation (which can outlast a
    scheduler's grace period), with exit code 143 and a checkpoint of that step without
    metrics, and no results.json. The same command again runs that evaluation first and ends
    as the uninterrupted ``reference``: one metrics line per step, step 4's with its
    evaluation, its pictures, results.json, the same parameters."""
    workdir = tmp_path_factory.mktemp("sigterm_eval") / "wd"
    args = ("--config.eval.batch_size=8",)  # 40 examples: 5 batches, checks 5 to 8
    check = ONE_PROCESS_STEPS + 1  # before the evaluation's second batch
    sigterm = {"JAXVAE_TEST_SIGTERM_AT_CHECK": str(check)}
    run = Run(workdir, zygote, *args, processes=1, own_env={0: sigterm})
    codes = _exit_codes(run)
    text = run.log(0)
    assert codes == [128 + signal.SIGTERM], text[-3000:]
    assert "The evaluation of step 4 was stopped before its end." in text
    assert "eval step 4:" not in text and "Traceback" not in text
    match = STOPPED.search(text)
    assert match and match.groups()[1:3] == ("4", "4"), text[-3000:]
    assert "Its evaluation is still to do: it runs first when you run the same command again" in (
        text
    )
    assert _checkpoints(workdir) == [2, 4]
    manager = checkpointing.create_manager(workdir / "checkpoints", 3, read_only=True)
    try:
        assert manager.metrics(4) is None and manager.best_step() is None
    finally:
        manager.close()
    assert not (workdir / "results.json").exists() and not (workdir / "images").exists()
    assert not any(k.startswith("test_") for k in metrics(workdir)[4])

    rerun = Run(workdir, zygote, *args, processes=1).wait()  # the same command again
    assert "eval step 4:" in rerun.log(0)
    want_dir = reference.wait().workdir
    got, want = metrics(workdir), metrics(want_dir)
    assert list(got) == list(want) == [2, 4]
    assert got[4].keys() == want[4].keys()
    for key in ("train_loss", "test_neg_elbo", "test_nll_iwae"):
        np.testing.assert_allclose(got[4][key], want[4][key], rtol=1e-5)
    results = json.loads((workdir / "results.json").read_text())
    assert results["step"] == 4
    np.testing.assert_allclose(results["test_neg_elbo"], want[4]["test_neg_elbo"], rtol=1e-5)
    assert len(list((workdir / "images").glob("*_step00000004.png"))) == 3
    jax.tree.map(
        np.testing.assert_array_equal,
        load_checkpoint(workdir, 4)[0],
        load_checkpoint(want_dir, 4)[0],
    )


def test_two_processes_stop_at_the_same_step(two_processes, tmp_path_factory, zygote):
    """SIGTERM to process 1 only, after step 1: JAX's preemption sync point stops both after
    the same step (one past the furthest step any process had reached, so at most a few steps
    later; logging every step keeps the processes in step); the same command again resumes,
    keeps one metrics history, and ends bit-identical to the uninterrupted ``two_processes``.
    """
    workdir = tmp_path_factory.mktemp("sigterm2") / "wd"
    args = (*TWO_PROCESS_ARGS, "--config.log_every_steps=1")
    t0 = time.monotonic()
    run = Run(workdir, zygote, *args, own_env={1: SIGTERM})
    codes = _exit_codes(run)
    logs = [run.log(0), run.log(1)]
    assert all(c != 0 for c in codes), (codes, logs[0][-2000:], logs[1][-2000:])
    steps = {_stopped_step(text, STEPS) for text in logs}
    assert len(steps) == 1, steps
    (step,) = steps
    assert SIGNAL_STEP <= step < STEPS and time.monotonic() - t0 < 240
    # The periodic checkpoints before the stop, and the stop's own.
    assert _checkpoints(workdir) == sorted({k for k in (2, 4) if k < step} | {step})

    resumed = Run(workdir, zygote, *args).wait()  # the same command again
    assert f"at step {step}" in resumed.log(0) and "Resumed from" in resumed.log(0)
    assert list(metrics(workdir)) == list(range(1, STEPS + 1))
    got, _ = load_checkpoint(workdir, STEPS)
    want, _ = load_checkpoint(two_processes.wait().workdir, STEPS)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def _wait_for_line(run: Run, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in run.log(0):
        if time.monotonic() > deadline or any(p.poll() is not None for p in run.procs):
            run.kill()
            pytest.fail(f"no {text!r} in time; process 0 logged:\n{run.log(0)[-3000:]}")
        time.sleep(0.2)


def test_dead_process_stops_the_other_and_leaves_complete_checkpoints(
    two_processes, tmp_path_factory, zygote
):
    """SIGKILL process 1 mid-run: process 0 exits non-zero within the heartbeat timeout (plus
    slack), and every checkpoint step left behind is complete and restorable."""
    workdir = tmp_path_factory.mktemp("killed") / "wd"
    # Resuming skips compiling the initialisation.
    shutil.copytree(two_processes.wait().workdir, workdir)
    run = Run(
        workdir,
        zygote,
        "--config.num_train_steps=100000",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2",
        "--config.eval_every_steps=100000",
        "--config.keep_checkpoints=3",
        f"--heartbeat_timeout={HEARTBEAT_S}",
    )
    _wait_for_line(run, f"step {STEPS + 6}/100000", timeout=240)
    run.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        code = run.procs[0].wait(timeout=120)
    finally:
        run.kill()
    elapsed = time.monotonic() - killed_at
    log = run.log(0)
    assert code != 0, log[-3000:]
    assert elapsed < 60, f"process 0 took {elapsed:.0f} s to stop"
    # JAX's C++ runtime ends the survivor (SIGABRT) with this line; the join line announced it.
    assert "Terminating process because the JAX distributed service detected fatal errors" in log
    assert f"JAX stops the others within about {HEARTBEAT_S} s" in log
    print(f"survivor exit code {code} after {elapsed:.1f} s")

    # An interrupted save stays a "<step>.orbax-checkpoint-tmp" folder that orbax never lists:
    # the latest step is complete and restores (older ones may be mid-deletion when killed).
    ckpt = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    manager = checkpointing.create_manager(ckpt, 3, read_only=True)
    try:
        latest = manager.latest_step()
    finally:
        manager.close()
    assert latest is not None and latest >= STEPS + 4 and latest == steps[-1], (latest, steps)
    state, _ = load_checkpoint(workdir, latest)
    assert int(state["step"]) == latest


def test_processes_that_disagree_or_never_meet(tmp_path, zygote):
    """Refused on every process before anything is written, with one line each: processes
    started with different configs (a resumed field and a model field), a run whose workdir
    another run holds (process 0 checks the lock, all refuse), and a process whose peers never
    start (it gives up after --join_timeout instead of JAX's abort)."""
    from multiprocess_launcher import hold_workdir_lock
    from test_train_faults import snapshot

    workdirs = {name: tmp_path / name / "wd" for name in ("disagree", "held", "alone")}
    for workdir in workdirs.values():
        workdir.mkdir(parents=True)
        (workdir / "notes.txt").write_text("the user's own file\n")
    holder = hold_workdir_lock(workdirs["held"])
    before = {name: snapshot(w) for name, w in workdirs.items()}
    mismatch = [
        ("--config.batch_size=16",),
        ("--config.batch_size=32", "--config.model.latent_dim=5"),
    ]
    runs = {
        "disagree": Run(workdirs["disagree"], zygote, own_args=mismatch),
        "held": Run(workdirs["held"], zygote),
        "alone": Run(workdirs["alone"], zygote, "--join_timeout=3", started=[0]),
    }
    try:
        t0 = time.monotonic()
        codes = {name: [p.wait(timeout=240) for p in run.procs] for name, run in runs.items()}
        elapsed = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
        for run in runs.values():
            run.kill()
    for name, run in runs.items():
        for i, code in enumerate(codes[name]):
            log = run.log(i)
            assert code == 1, f"{name} process {i}: exit {code}\n{log[-3000:]}"
            assert log.count("error:") == 1 and "Traceback" not in log, log[-3000:]
        assert snapshot(workdirs[name]) == before[name], name
    for i in (0, 1):
        assert (
            "config.batch_size: 16 on process 0, 32 on process 1; config.model.latent_dim: 4 on "
            "process 0, 5 on process 1. Nothing was written" in runs["disagree"].log(i)
        )
        assert f"is in use by another run (pid {holder.pid} on host " in runs["held"].log(i)
    assert "process 0 of 2 waited 3 s (--join_timeout) for the other processes" in (
        runs["alone"].log(0)
    )
    assert elapsed < 120, f"took {elapsed:.0f} s"
