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
``glibc.malloc.hugetlb`` (the user decided; this is also what stops a second re-exec), the
environment variable ``JAXVAE_HUGEPAGES=0`` opts out, or JAX is going to compute on an
accelerator (``jaxvae.backend.accelerator_expected``: the gain is a CPU one, and a GPU/TPU
process stays exactly as it was started). :func:`reexec_with_hugepages` also never re-executes
a process whose command line cannot simply be run again: an IPython/Jupyter kernel (that would
kill the kernel), an interactive interpreter, ``python -c`` or a script read from stdin. This
module imports nothing heavy.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

from jaxvae import backend

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
    accelerator: bool | None = None,
) -> dict[str, str] | None:
    """The environment to re-execute with, or ``None`` when nothing should change.

    ``system``, ``glibc``, ``thp_mode`` and ``accelerator`` default to this machine's
    (``platform.system()``, the glibc version, the transparent-huge-page mode,
    ``jaxvae.backend.accelerator_expected``); tests pass them explicitly.
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
    if accelerator is None:
        accelerator = backend.accelerator_expected(environ)
    if accelerator:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([*tunables, f"{TUNABLE}=1"])
    return env


def can_reexec(
    *,
    modules: Collection[str] | None = None,
    argv: list[str] | None = None,
    interactive: bool | None = None,
) -> bool:
    """Whether running this process's command line again gives the same program.

    True for ``python script.py ...`` and ``python -m module ...`` (``sys.argv[0]`` is then a
    file). False inside IPython or a Jupyter kernel (``ipykernel``/``IPython`` imported:
    re-executing would replace the kernel), for an interactive interpreter (``-i`` or none
    at all), ``python -c ...`` and a script read from stdin. ``modules`` (``sys.modules``),
    ``argv`` (``sys.argv``) and ``interactive`` (``sys.flags.interactive``) are for tests.
    """
    modules = sys.modules if modules is None else modules
    argv = sys.argv if argv is None else argv
    interactive = bool(sys.flags.interactive) if interactive is None else interactive
    if "ipykernel" in modules or "IPython" in modules or interactive:
        return False
    if not argv or argv[0] in ("", "-", "-c"):
        return False
    return os.path.isfile(argv[0])


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command line with huge-page malloc, when it helps.

    Returns (doing nothing) when :func:`hugepage_environ` says so (accelerator hosts
    included) or when :func:`can_reexec` is false (a notebook kernel). Call it before
    anything else has started (threads, jax): ``os.execve`` keeps the PID and the open
    standard streams but nothing else. ``sys.orig_argv`` is the command line as given
    (``python -m ...`` and interpreter options included).
    """
    if not can_reexec():
        return
    env = hugepage_environ(os.environ)
    if env is not None:
        _reexec(env)


def reexec_with_default_malloc() -> None:
    """The opposite, for benchmarks: restarts without the tunable (and opted out) if it is on."""
    if not hugepages_active() or not can_reexec():
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
