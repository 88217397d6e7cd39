"""Stopping a training run cleanly: SIGTERM / SIGINT end it at the next step boundary.

Schedulers announce a preemption with SIGTERM (TPU VMs, Kubernetes, SLURM) and a person with
Ctrl-C (SIGINT). Either one asks the training loop to stop after the step in flight, or, during
an evaluation, after its batch in flight (an evaluation can take minutes, more than a
scheduler's grace period); the loop then saves a checkpoint of exactly that step, waits for it
to be written and raises :class:`Preempted`, whose message says which step was saved and that
rerunning the same command resumes. A second Ctrl-C aborts at once, without a checkpoint.

One process: a Python signal handler records the request and :meth:`StopSignal.reached` is
true at the next check.

Several processes (``jax.distributed``): every process must stop at the *same* point, or the
collective that follows would wait forever for the ones that stopped. JAX's preemption
service does exactly that agreement: its own handler catches SIGTERM in any process, tells
the coordinator, and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
becomes true in every process at the same check (one past the furthest any process had
reached; the checks are numbered, the same in every process). So no Python handler is installed
for SIGTERM there, and Ctrl-C is forwarded to it as a SIGTERM to this process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

import jax


class Preempted(Exception):
    """The run stopped early on a signal after saving a checkpoint; rerunning resumes it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _write(text: str) -> None:
    # os.write: safe inside a signal handler, unlike print() on a buffered stream.
    os.write(sys.stderr.fileno(), text.encode())


class StopSignal:
    """Context manager: SIGTERM / SIGINT request a stop; :meth:`reached` says when to stop.

    Use ``with StopSignal() as stop:`` around the training loop and call ``stop.reached()``
    after every training step and between evaluation batches, at the same points in every
    process.
    """

    def __init__(
        self, multi_process: bool | None = None, on_abort: Callable[[], None] | None = None
    ):
        """``on_abort`` runs before a second Ctrl-C ends the process (which skips every
        ``finally``): e.g. releasing the workdir's lock."""
        self.multi_process = jax.process_count() > 1 if multi_process is None else multi_process
        self.on_abort = on_abort
        self.signum: int | None = None
        self.checks = 0  # calls of reached(): JAX's sync point counts them
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """A stop was requested in this process (any process, after :meth:`reached`)."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The shell convention 128 + signal number (SIGTERM when the request came from afar)."""
        return 128 + (self.signum or signal.SIGTERM)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a preemption notice"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            _write("\nerror: interrupted twice; aborted without saving a checkpoint.\n")
            if self.on_abort is not None:
                self.on_abort()
            os._exit(128 + signal.SIGINT)
        first = self.signum is None
        self.signum = signum
        if first:
            _write(
                f"\n{signal.Signals(signum).name}: stopping after the current step (or evaluation "
                "batch) and saving a checkpoint (press Ctrl-C again to abort at once).\n"
            )
        if self.multi_process and signum == signal.SIGINT:
            # Hand the request to JAX's preemption service (its handler owns SIGTERM).
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        signums = [signal.SIGINT] if self.multi_process else [signal.SIGINT, signal.SIGTERM]
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def reached(self) -> bool:
        """True when the run must stop here; at the same call in every process."""
        self.checks += 1
        if not self.multi_process:
            return self.signum is not None
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(self.checks):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False


__all__ = ["Preempted", "StopSignal"]
