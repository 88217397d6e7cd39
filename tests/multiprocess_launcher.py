"""Runs ``python train.py ARGS`` in this process on virtual CPU devices and tfds mock data.

A helper of ``tests/test_multiprocess.py``, started as a subprocess once per simulated host:

  python tests/multiprocess_launcher.py --config configs/tiny.py --num_processes 2 ...

Environment: ``JAXVAE_TEST_CPU_DEVICES`` (devices of this process, default 4),
``JAXVAE_TEST_MOCK_EXAMPLES`` (mock split size, default 40), ``JAXVAE_TEST_SIGTERM_AT_STEP``
(this process sends itself SIGTERM once that step is done: a scheduler's preemption notice at
a known step, without polling the log). Every process generates the same mock examples (tfds
seeds them by index), so all processes see identical data.
"""

from __future__ import annotations

import gc
import os
import runpy
import signal
import subprocess
import sys
import threading
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


def sigterm_after_step(step: int) -> None:
    """Makes this process send itself SIGTERM right after training step ``step``.

    The signal goes through the real path (the installed handler, or JAX's preemption notifier
    in a multi-process run); only its timing is fixed: just before the loop asks
    :meth:`jaxvae.preemption.StopSignal.reached` about that step.
    """
    from jaxvae import preemption  # noqa: PLC0415

    reached = preemption.StopSignal.reached

    def signalling_reached(self, done: int) -> bool:
        if done == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return reached(self, done)

    preemption.StopSignal.reached = signalling_reached


def main() -> None:
    """Sets the device count, enters tfds's mock data and runs train.py as ``__main__``."""
    import jax  # noqa: PLC0415 - only in the subprocess, never when pytest imports this file

    jax.config.update("jax_num_cpu_devices", int(os.environ.get("JAXVAE_TEST_CPU_DEVICES", "4")))
    sys.path.insert(0, str(ROOT))
    if "JAXVAE_TEST_SIGTERM_AT_STEP" in os.environ:
        sigterm_after_step(int(os.environ["JAXVAE_TEST_SIGTERM_AT_STEP"]))
    import tensorflow_datasets as tfds  # noqa: PLC0415

    confine_mock_fs_to_its_thread()
    collect_less()
    num_examples = int(os.environ.get("JAXVAE_TEST_MOCK_EXAMPLES", "40"))
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    with tfds.testing.mock_data(num_examples=num_examples):
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
