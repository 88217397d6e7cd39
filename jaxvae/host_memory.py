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
environment variable ``JAXVAE_HUGEPAGES=0`` opts out, or the process is going to compute on an
accelerator (:func:`accelerator_hint`: the measured gain is a CPU one, and a GPU/TPU process
stays exactly as it was started). :func:`reexec_with_hugepages` also never re-executes a
process whose command line cannot simply be run again: an IPython/Jupyter kernel (that would
kill the kernel), an interactive interpreter, ``python -c`` or a script read from stdin.

Accelerators are recognised from cheap signals, without importing jax: ``JAX_PLATFORMS``
(whose first entry decides: ``cpu`` means CPU whatever else is installed), a JAX
accelerator plugin on ``sys.path`` (``libtpu``, ``jax_cuda12_plugin``, ``jax_cuda13_plugin``,
``jax_rocm*_plugin``, any module in the ``jax_plugins`` namespace package or ``jax_plugins``
entry point, which is how jax finds its PJRT plugins), the device nodes of an NVIDIA GPU
(``/dev/nvidia0``) or a TPU (``/dev/accel0``, VFIO groups in ``/dev/vfio``), and the variables
of a TPU VM or Colab TPU (``TPU_NAME``, ``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_HOSTNAMES``,
``COLAB_TPU_ADDR``, ``TPU_LIBRARY_PATH``; ``PJRT_NAMES_AND_LIBRARY_PATHS`` for any PJRT plugin).
A GPU or a plugin without the other (a CPU-only jax on a GPU box) counts too: erring that way
only forgoes a CPU speed-up, which ``JAX_PLATFORMS=cpu`` or an exported
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` restores. This module imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import platform
import re
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT_VAR = "JAXVAE_HUGEPAGES"
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Set on Cloud TPU VMs and Colab TPU runtimes, or point jax at a TPU / PJRT plugin library.
ACCELERATOR_ENV_VARS = (
    "TPU_NAME",
    "TPU_ACCELERATOR_TYPE",
    "TPU_WORKER_HOSTNAMES",
    "COLAB_TPU_ADDR",
    "TPU_LIBRARY_PATH",
    "PJRT_NAMES_AND_LIBRARY_PATHS",
)
# Top-level modules of JAX's accelerator plugins (libtpu for TPUs; the CUDA/ROCm PJRT plugins).
_PLUGIN_MODULE = re.compile(r"libtpu|libtpu_nightly|jax_cuda\d+_plugin|jax_rocm\d*_plugin")
# An NVIDIA GPU; a TPU (v4 and later: accel; v5e and v6e VMs: VFIO groups, /dev/vfio/<n>,
# beside the /dev/vfio/vfio container node that any host may have). Not /dev/kfd: laptops with
# an AMD integrated GPU have it too; a ROCm JAX shows as its plugin.
_DEVICE_NODES = ("/dev/nvidia0", "/dev/accel0")
_VFIO = "/dev/vfio"


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


def _installed_plugin_modules() -> set[str]:
    """Names of JAX accelerator plugin modules importable here (no module is imported).

    The top-level modules on ``sys.path`` that match the known plugins (listed by name:
    ``jax_cuda12_plugin`` is a directory without ``__init__.py``, which ``pkgutil`` skips),
    the modules in the ``jax_plugins`` namespace package and the ``jax_plugins`` entry points:
    the places where ``jax._src.xla_bridge.discover_pjrt_plugins`` looks.
    """
    found = set()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:  # a zip file, a missing folder
            continue
        found |= {n.split(".")[0] for n in names if _PLUGIN_MODULE.fullmatch(n.split(".")[0])}
    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        found |= {
            f"jax_plugins.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)
        }
    try:
        from importlib.metadata import entry_points

        found |= {ep.value for ep in entry_points(group="jax_plugins")}
    except Exception:  # a broken distribution's metadata must not stop the program
        pass
    return found


def _vfio_groups(path: str = _VFIO) -> list[str]:
    try:
        return [n for n in os.listdir(path) if n != "vfio"]
    except OSError:
        return []


def accelerator_hint(
    environ: Mapping[str, str],
    *,
    plugins: Collection[str] | None = None,
    exists: Callable[[str], bool] | None = None,
    vfio_groups: Collection[str] | None = None,
) -> str | None:
    """Why this process is going to use a GPU/TPU (a short phrase), or ``None`` for CPU.

    Decided without importing jax (see the module docstring). ``JAX_PLATFORMS`` wins when set:
    its first entry is the default backend, so ``cpu`` (or ``cpu,cuda``) means CPU even on a
    GPU host, and anything else (``cuda``, ``tpu``, ``rocm``, ...) means an accelerator.
    ``plugins`` (installed plugin module names), ``exists`` (device node test) and
    ``vfio_groups`` (entries of ``/dev/vfio``) default to this machine's; tests pass them.
    """
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        first = platforms.split(",")[0].strip()
        return None if first == "cpu" else f"JAX_PLATFORMS={platforms}"
    for var in ACCELERATOR_ENV_VARS:
        if environ.get(var):
            return f"{var} is set"
    exists = os.path.exists if exists is None else exists
    for node in _DEVICE_NODES:
        if exists(node):
            return f"{node} exists"
    groups = _vfio_groups() if vfio_groups is None else vfio_groups
    if groups:
        return f"VFIO device groups in {_VFIO}"
    plugins = _installed_plugin_modules() if plugins is None else plugins
    if plugins:
        return f"JAX plugin installed: {', '.join(sorted(plugins))}"
    return None


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
    (``platform.system()``, the glibc version, the transparent-huge-page mode, whether
    :func:`accelerator_hint` finds a GPU/TPU); tests pass them explicitly.
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
        accelerator = accelerator_hint(environ) is not None
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
