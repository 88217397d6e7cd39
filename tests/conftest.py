"""Test set-up: every test process sees 8 CPU devices.

This must run before JAX initialises its backends, so it lives at import time
of the conftest, which pytest loads before any test module.
"""

import atexit
import os
import shutil
import tempfile

# multiprocess_launcher imports no JAX at module level, so this precedes JAX's initialisation.
from multiprocess_launcher import (
    FAST_COMPILE,
    Zygote,
    collect_less,
    confine_mock_fs_to_its_thread,
    run_env,
)

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (used by tensorflow-datasets) must never take an accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Many tests build the same step functions again (each train_and_evaluate call traces its own
# closures); JAX's persistent compilation cache turns those repeated XLA compilations into
# cache hits. One fresh temporary folder for the whole test run: made by the first process
# that loads this file (pytest itself, or its xdist controller, whose environment the workers
# inherit), removed when that process ends.
_CACHE_ENV = "JAXVAE_TEST_XLA_CACHE"
if _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="jaxvae-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
_xla_cache = os.environ[_CACHE_ENV]
jax.config.update("jax_compilation_cache_dir", _xla_cache)
# ... which is also the cache of the train.py processes the tests start (jaxvae.compilation_cache):
# tests never write to the user's own cache folder.
os.environ["JAXVAE_COMPILATION_CACHE"] = _xla_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The test run's one compilation cache, for the ``train.py`` subprocesses too."""
    return Path(_xla_cache)


@pytest.fixture(scope="session")
def zygote(cache_dir) -> Iterator[Zygote]:
    """Starts ``train.py`` subprocesses (``tests/multiprocess_launcher.py``) as forks of one
    process that has imported everything: made at the first test that needs it."""
    z = Zygote(run_env(cache_dir))
    yield z
    z.close()


@pytest.fixture
def train_py(monkeypatch):
    """``train_py(*args)`` runs ``python train.py ARGS`` in this process; returns its exit code.

    config_flags reads the ``--config.<field>`` overrides from ``sys.argv``, as for a real
    command line, so the test (not the program) sets it.
    """
    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))  # train.py is a script at the repository root
    from absl import app

    import train
    from jaxvae import cli

    def run(*args: str) -> int | str | None:
        argv = ["train.py", *args]
        monkeypatch.setattr(sys, "argv", argv)
        try:
            app.run(train.main, argv, flags_parser=cli.parse_flags)
        except SystemExit as e:
            return e.code
        return 0

    return run


# tfds.testing.mock_data redirects file access of the whole process while a mocked dataset is
# read; confine it to the thread that entered it so orbax's background saves are not redirected.
confine_mock_fs_to_its_thread()


# The slowest files first, longest first (test-seconds of a clean-clone run, 2026-12-03,
# 683f854, on a machine at half the speed of the one in docs/testing.md's 4 min 39 s run):
# pytest-xdist's `--dist loadfile` hands files to the workers in this order (see
# pytest_configure), so starting with the longest ones keeps both workers busy until the end
# instead of one finishing a long file alone.
_SLOW_FILES = (
    "test_train_step.py",  # ~212 s
    "test_multiprocess.py",  # ~144 s: subprocess runs
    "test_train.py",  # ~116 s
    "test_vamp.py",  # ~78 s
    "test_train_faults.py",  # ~75 s
    "test_losses.py",  # ~62 s
    "test_notebook.py",  # ~56 s
    "test_evaluate.py",  # ~43 s
    "test_models.py",  # ~40 s
    "test_estimators.py",  # ~40 s
    "losses.py",  # ~27 s: the doctests
    "test_layers.py",  # ~22 s
    "test_readme.py",  # ~17 s
    "test_convert.py",  # ~17 s
)


def pytest_configure(config):
    """pytest-xdist would hand out the files by their number of tests (its default
    ``--loadscope-reorder``: the 5 subprocess tests of test_multiprocess.py after files of 40
    quick ones); keep the order below."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_finish(session):
    """Once every test module (TensorFlow, Flax, ...) is imported: see ``collect_less``."""
    collect_less()


def pytest_collection_modifyitems(items):
    """Orders the tests so that the slowest files run first (stable otherwise)."""

    def rank(item) -> int:
        name = Path(str(item.fspath)).name
        return _SLOW_FILES.index(name) if name in _SLOW_FILES else len(_SLOW_FILES)

    items.sort(key=rank)
