"""Host memory: start the process with glibc's transparent-huge-page malloc where it helps.

Why. XLA's CPU backend allocates the buffers of every step (outputs and the temporaries of a
jitted step, hundreds of MB for the seed VAE) with ``malloc``; glibc serves allocations that
large with a fresh ``mmap`` and returns them with ``munmap``, so every step first-touches all
of that memory again, 4 KiB page by 4 KiB page, and page faults are serialised in the
kernel. glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35: ``madvise(MADV_HUGEPAGE)``
on large ``mmap`` chunks) backs them with 2 MiB pages instead, which makes the CPU training
step markedly faster (``benchmarks/alloc_probe.py``, ``benchmarks/README.md``). It changes no
result, only how the kernel backs the memory.

glibc reads tunables once, when the process starts, so the setting cannot be applied from
inside a running interpreter: :func:`reexec_with_hugepages` re-executes the current command
line with ``GLIBC_TUNABLES`` extended. ``train.py`` and the benchmarks call it first thing,
before importing jax. Library users who start Python themselves (a notebook) can export
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` before starting it.

It is skipped (the process just continues) when: not Linux, not glibc >= 2.35, transparent
huge pages are ``never`` (nothing to ask for), ``GLIBC_TUNABLES`` already sets
``glibc.malloc.hugetlb`` (the user decided; this is also what stops a second re-exec), or the
environment variable ``JAXVAE_HUGEPAGES=0`` opts out. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT_VAR = "JAXVAE_HUGEPAGES"
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, ...] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def _thp_mode() -> str | None:
    """The bracketed word of ``/sys/kernel/mm/transparent_hugepage/enabled``, if readable."""
    try:
        text = _THP_ENABLED.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _tunables(environ: Mapping[str, str]) -> list[str]:
    """The ``name=value`` items of ``GLIBC_TUNABLES``."""
    return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def hugepage_environ(
    environ: Mapping[str, str],
    *,
    system: str | None = None,
    glibc: tuple[int, ...] | None = None,
    thp_mode: str | None = None,
) -> dict[str, str] | None:
    """The environment to re-execute with, or ``None`` when nothing should change.

    ``system``, ``glibc`` and ``thp_mode`` default to this machine's (``platform.system()``,
    the glibc version, the transparent-huge-page mode); tests pass them explicitly.
    """
    if environ.get(OPT_OUT_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    tunables = _tunables(environ)
    if any(t.split("=", 1)[0] == TUNABLE for t in tunables):
        return None
    system = platform.system() if system is None else system
    glibc = _glibc_version() if glibc is None else glibc
    thp_mode = _thp_mode() if thp_mode is None else thp_mode
    if system != "Linux" or glibc is None or glibc < (2, 35) or thp_mode in (None, "never"):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([*tunables, f"{TUNABLE}=1"])
    return env


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command line with huge-page malloc, when it helps.

    Returns (doing nothing) when :func:`hugepage_environ` says so. Call it before anything
    else has started (threads, jax): ``os.execve`` keeps the PID and the open standard
    streams but nothing else. ``sys.orig_argv`` is the command line as given (``python -m
    ...`` and interpreter options included).
    """
    env = hugepage_environ(os.environ)
    if env is not None:
        _reexec(env)


def reexec_with_default_malloc() -> None:
    """The opposite, for benchmarks: restarts without the tunable (and opted out) if it is on."""
    if not hugepages_active():
        return
    env = dict(os.environ, **{OPT_OUT_VAR: "0"})
    kept = [t for t in _tunables(env) if t.split("=", 1)[0] != TUNABLE]
    env.pop("GLIBC_TUNABLES")
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    _reexec(env)


def _reexec(env: dict[str, str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def hugepages_active() -> bool:
    """Whether this process was started with glibc's huge-page malloc tunable."""
    return f"{TUNABLE}=1" in _tunables(os.environ)
