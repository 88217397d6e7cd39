"""SIGTERM in the middle of ``train.py``: a checkpoint of that step, a clear exit, exact resume.

Real subprocesses (``tests/multiprocess_launcher.py``: virtual CPU devices, tfds mock data), as
a scheduler would see them: one process, and two processes joined by ``jax.distributed`` where
the signal reaches only one of them and both must stop at the same step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_multiprocess import ROOT, Run, load_checkpoint

pytestmark = pytest.mark.multiprocess

STEPS = 10
SIGNAL_STEP = 2  # the step after which a process receives SIGTERM
SIGTERM = {"JAXVAE_TEST_SIGTERM_AT_STEP": str(SIGNAL_STEP)}
ARGS = (
    f"--config.num_train_steps={STEPS}",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1000",
    "--config.eval_every_steps=1000",
)
STOPPED = re.compile(
    rf"Stopped by (\S+(?: \S+)*) at step (\d+) of {STEPS}: checkpoint saved in (\S+)\."
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """One process x 8 devices, all steps in one go; started, not awaited (``.wait()``)."""
    run = Run(tmp_path_factory.mktemp("full") / "wd", cache_dir, *ARGS, processes=1)
    yield run
    run.kill()


def _exit_codes(run: Run) -> list[int]:
    try:
        return [p.wait(timeout=240) for p in run.procs]
    finally:
        run.kill()


def _stopped_step(log: str) -> int:
    match = STOPPED.search(log)
    assert match, log[-3000:]
    assert "Run the same command again to resume" in log and "Traceback" not in log
    return int(match.group(2))


def test_sigterm_saves_the_step_and_resumes_exactly(uninterrupted, tmp_path_factory, cache_dir):
    """SIGTERM after step 2 (the launcher sends it: no polling): exit code 143, a checkpoint of
    exactly step 2 and nothing else, the workdir lock gone; the same command again resumes
    and ends bit-identical to an uninterrupted run."""
    workdir = tmp_path_factory.mktemp("sigterm") / "wd"
    run = Run(workdir, cache_dir, *ARGS, processes=1, own_env={0: SIGTERM})
    codes = _exit_codes(run)
    text = run.log(0)
    assert codes == [128 + signal.SIGTERM], text[-3000:]
    assert "SIGTERM: stopping after the current step" in text
    assert _stopped_step(text) == SIGNAL_STEP
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(SIGNAL_STEP)]
    assert not (workdir / "results.json").exists()
    assert not (workdir / "jaxvae.lock").exists()  # the workdir is free for the rerun

    Run(workdir, cache_dir, *ARGS, processes=1).wait()  # the same command again
    uninterrupted.wait()
    got, _ = load_checkpoint(workdir, STEPS)
    want, _ = load_checkpoint(uninterrupted.workdir, STEPS)
    jax.tree.map(np.testing.assert_array_equal, got, want)  # bit-identical on CPU


def test_two_processes_stop_at_the_same_step(tmp_path_factory, cache_dir):
    """SIGTERM to process 1 only, after step 2: JAX's preemption sync point stops both after
    the same step (one past the furthest step any process had reached, so at most a few steps
    later); the same command again resumes bit-identical to an uninterrupted two-process run.
    """
    workdir = tmp_path_factory.mktemp("sigterm2") / "wd"
    t0 = time.monotonic()
    run = Run(workdir, cache_dir, *ARGS, own_env={1: SIGTERM})
    codes = _exit_codes(run)
    logs = [run.log(0), run.log(1)]
    assert all(c != 0 for c in codes), (codes, logs[0][-2000:], logs[1][-2000:])
    steps = {_stopped_step(text) for text in logs}
    assert len(steps) == 1, steps
    (step,) = steps
    assert SIGNAL_STEP <= step < STEPS and time.monotonic() - t0 < 240
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(step)]

    # The same command again, next to an uninterrupted two-process run (one process's run
    # differs from it by rounding: the device sums run in another order).
    resumed = Run(workdir, cache_dir, *ARGS)
    full = Run(tmp_path_factory.mktemp("full2") / "wd", cache_dir, *ARGS)
    resumed.wait(), full.wait()
    got, _ = load_checkpoint(workdir, STEPS)
    want, _ = load_checkpoint(full.workdir, STEPS)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_second_ctrl_c_releases_the_workdir_lock(tmp_path):
    """A second Ctrl-C ends the process at once, skipping every ``finally``: the run's workdir
    lock is removed first (no stale lock for the next run to take over)."""
    code = (
        "import os, signal, sys, time\n"
        "from jaxvae import preemption, workdir_lock\n"
        "lock = workdir_lock.acquire(sys.argv[1])\n"
        "with preemption.StopSignal(multi_process=False, on_abort=lock.release):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    workdir = tmp_path / "wd"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "interrupted twice; aborted without saving a checkpoint" in proc.stderr
    assert not workdir.exists()  # lock and the folder made for it: gone
