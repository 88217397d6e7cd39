"""A second Ctrl-C: the run ends at once, and its workdir lock goes first.

SIGTERM in the middle of ``train.py`` runs (a checkpoint of that step, a clear exit, exact
resume; one process, and one of two) is tested in ``tests/test_multiprocess.py``, next to the
uninterrupted runs it is compared with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from test_multiprocess import ROOT

pytestmark = pytest.mark.multiprocess


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
