"""One training run per workdir: a lock file taken at start and removed at exit.

Two runs training the same workdir (the same command started twice, a job submitted again)
would both append to ``metrics.jsonl`` and write the same checkpoints. :func:`acquire` creates
``<workdir>/jaxvae.lock`` atomically (``O_CREAT | O_EXCL``) holding the pid, host, start time
and command of its run; a second run finds it and is refused with :class:`WorkdirBusyError`,
whose message names the holder. :meth:`Lock.release` removes it, and the folders made for it
when the run left them empty, so a refused run leaves nothing behind.

A lock whose holder died without removing it (``kill -9``, a crashed host process) is *stale*:
on the holder's own host that is decided from its pid (and, on Linux, the pid's start time,
so that a reused pid does not count), and the lock is taken over with a note. A lock from
another host cannot be checked from here; the message says so and how to remove it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from jaxvae import paths

LOCK_NAME = "jaxvae.lock"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir (or its lock cannot be read); nothing was written."""


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces
    except (OSError, ValueError, IndexError):
        return None


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in the lock file."""

    pid: int
    host: str
    since: str
    command: str
    start_ticks: int | None
    token: str  # tells this run's lock from a later one of the same pid

    @classmethod
    def this_process(cls) -> Holder:
        now = datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
        command = " ".join(sys.argv)
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            since=now,
            command=command if len(command) <= 300 else command[:297] + "...",
            start_ticks=_start_ticks(os.getpid()),
            token=uuid.uuid4().hex,
        )

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}: {self.command}"

    def alive(self) -> bool | None:
        """True / False on this host; None on another host, where it cannot be checked."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a process of another user: it exists
            pass
        now = _start_ticks(self.pid)
        return self.start_ticks is None or now is None or now == self.start_ticks


def read_holder(workdir: str | Path) -> Holder | None:
    """The holder of ``workdir``'s lock; None when there is no lock.

    Raises :class:`WorkdirBusyError` when the lock file cannot be read (a run writing it at
    this moment, or a damaged file): the message says how to remove it.
    """
    path = Path(workdir) / LOCK_NAME
    try:
        fields = json.loads(path.read_text())
        return Holder(**{f.name: fields[f.name] for f in dataclasses.fields(Holder)})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise WorkdirBusyError(
            f"{path}, the lock of a run using --workdir {path.parent}, cannot be read "
            f"({type(e).__name__}: {e}); a run may be starting there right now. Nothing was "
            f"changed; if no run is using that workdir, delete the lock (rm {path}) and run "
            "again."
        ) from e


def _busy(workdir: Path, holder: Holder, alive: bool | None) -> WorkdirBusyError:
    if alive is None:
        return WorkdirBusyError(
            f"--workdir {workdir} is in use by a run on another host ({holder.describe()}); "
            "whether it still runs cannot be checked from here. Nothing was changed; if it does "
            f"not run any more, delete its lock (rm {workdir / LOCK_NAME}) and run again, "
            "otherwise wait for it or use another --workdir."
        )
    return WorkdirBusyError(
        f"--workdir {workdir} is in use by another run ({holder.describe()}); a workdir is "
        "trained by one run at a time. Nothing was changed; wait for that run to end, stop it, "
        "or use another --workdir (--mode eval|sample may read a workdir that is training)."
    )


@contextlib.contextmanager
def _one_taker_at_a_time(folder: Path) -> Iterator[None]:
    """Serialises lock-taking on this host (two runs taking over the same stale lock);
    best effort where the file system cannot lock a folder."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # e.g. NFS without folder locks
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the flock


@dataclasses.dataclass
class Lock:
    """A held workdir lock; :meth:`release` (idempotent) gives it back."""

    path: Path
    holder: Holder
    made: list[Path]  # folders made for the lock, removed again if the run leaves them empty
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        with contextlib.suppress(WorkdirBusyError, OSError):
            current = read_holder(self.path.parent)
            if current is not None and current.token == self.holder.token:  # still ours
                self.path.unlink()
        paths.remove_if_empty(self.made)


def acquire(workdir: str | Path) -> Lock:
    """Takes ``workdir``'s lock (making the folder if needed); raises WorkdirBusyError."""
    workdir = Path(workdir)
    path = workdir / LOCK_NAME
    made = paths.make_folder(workdir)
    try:
        with _one_taker_at_a_time(workdir):
            for _ in range(3):  # a run on another host may take or drop the lock meanwhile
                holder = read_holder(workdir)
                if holder is not None:
                    alive = holder.alive()
                    if alive is not False:
                        raise _busy(workdir, holder, alive)
                    path.unlink(missing_ok=True)
                    print(
                        f"note: took over {path} from a run that no longer runs "
                        f"({holder.describe()}).",
                        file=sys.stderr,
                        flush=True,
                    )
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
                me = Holder.this_process()
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(dataclasses.asdict(me)) + "\n")
                return Lock(path, me, made)
            raise WorkdirBusyError(
                f"--workdir {workdir}: its lock {path} changed hands while this run tried to "
                "take it; nothing was changed. Another run is starting there: wait for it, or "
                "use another --workdir."
            )
    except BaseException:
        paths.remove_if_empty(made)
        raise


__all__ = ["LOCK_NAME", "Holder", "Lock", "WorkdirBusyError", "acquire", "read_holder"]
