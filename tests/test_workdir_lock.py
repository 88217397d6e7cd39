"""One run per workdir (jaxvae.workdir_lock): exclusive, removed on release, stale locks.

No JAX here: the holders are small Python processes (``hold_workdir_lock``), so a live holder
and one killed by SIGKILL are real processes, as a training run would be.
"""

import json
import os
import socket

import pytest
from multiprocess_launcher import hold_workdir_lock

from jaxvae import workdir_lock
from jaxvae.workdir_lock import LOCK_NAME, WorkdirBusyError


def test_one_holder_at_a_time_and_nothing_left_behind(tmp_path):
    workdir = tmp_path / "runs" / "wd"  # neither folder exists yet
    lock = workdir_lock.acquire(workdir)
    held = json.loads((workdir / LOCK_NAME).read_text())
    assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
    with pytest.raises(WorkdirBusyError, match=f"in use by another run \\(pid {os.getpid()} "):
        workdir_lock.acquire(workdir)  # this process already trains it
    lock.release()
    lock.release()  # idempotent
    assert not (tmp_path / "runs").exists()  # the folders made for the lock went with it

    (workdir).mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    workdir_lock.acquire(workdir).release()
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]


def test_a_live_holder_refuses_every_other_run_and_a_killed_one_is_taken_over(tmp_path, capsys):
    holder = hold_workdir_lock(tmp_path)
    try:
        before = (tmp_path / LOCK_NAME).read_bytes()
        for _ in range(2):  # a second and a third run
            with pytest.raises(WorkdirBusyError) as e:
                workdir_lock.acquire(tmp_path)
            assert f"pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
            assert (tmp_path / LOCK_NAME).read_bytes() == before
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind
        holder.wait()
    assert (tmp_path / LOCK_NAME).read_bytes() == before
    lock = workdir_lock.acquire(tmp_path)
    assert f"took over {tmp_path / LOCK_NAME} from a run that no longer runs (pid {holder.pid}" in (
        capsys.readouterr().err
    )
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def _write_lock(workdir, **changes):
    fields = {**vars(workdir_lock.Holder.this_process()), **changes}
    (workdir / LOCK_NAME).write_text(json.dumps(fields))


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """The pid is alive, but it is another process than the holder (it started at another
    time): the lock is stale."""
    ticks = workdir_lock.Holder.this_process().start_ticks
    if ticks is None:
        pytest.skip("process start times need Linux's /proc")
    _write_lock(tmp_path, start_ticks=ticks - 1)
    workdir_lock.acquire(tmp_path).release()


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["on another host", "cannot be checked from here", "rm "]),
        ('{"pid": 12', ["cannot be read", "a run may be starting", "rm "]),
    ],
    ids=["another host", "cut short"],
)
def test_a_lock_that_cannot_be_checked_is_left_alone(tmp_path, content, words):
    if content is None:
        _write_lock(tmp_path, host="another-host.example")
    else:
        (tmp_path / LOCK_NAME).write_text(content)
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(WorkdirBusyError) as e:
        workdir_lock.acquire(tmp_path)
    for w in words:
        assert w in str(e.value)
    assert f"rm {tmp_path / LOCK_NAME}" in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    assert (tmp_path / LOCK_NAME).read_bytes() == before
