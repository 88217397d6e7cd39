"""Which platform JAX will compute on: the one answer jaxvae uses before JAX starts.

JAX computes on its default backend: the first entry of ``JAX_PLATFORMS`` when that is set,
otherwise a GPU/TPU when one of JAX's accelerator plugins is installed (``libtpu``, the
CUDA/ROCm PJRT plugins, anything in the ``jax_plugins`` entry points or namespace package: how
JAX itself finds them), otherwise the CPU. Two decisions must be taken before JAX starts and
use :func:`accelerator_expected`: the huge-page malloc restart of ``train.py``
(``jaxvae.host_memory``, a CPU measure) and the CPU collectives of a multi-process run
(``jaxvae.distributed``). Once JAX runs, ``jax.default_backend()`` is the answer
(``jaxvae.layers`` picks its convolution formulation with it).

An installed plugin without a working device (a CUDA plugin on a machine without a GPU) counts
as an accelerator: erring that way only forgoes a CPU speed-up, which ``JAX_PLATFORMS=cpu``
restores. Nothing here imports JAX.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Collection, Mapping

# Top-level modules of JAX's accelerator plugins (libtpu; the CUDA/ROCm PJRT plugins and the
# jax_plugins namespace package they may live in).
PLUGIN_MODULES = (
    "libtpu",
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
    "jax_plugins",
)


def installed_plugins() -> set[str]:
    """Names of the JAX accelerator plugins installed here (nothing is imported)."""
    found = {m for m in PLUGIN_MODULES if importlib.util.find_spec(m) is not None}
    try:
        found |= {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    except Exception:  # a broken distribution's metadata must not stop the program
        pass
    return found


def accelerator_expected(
    environ: Mapping[str, str] | None = None, *, plugins: Collection[str] | None = None
) -> bool:
    """Whether JAX will compute on a GPU/TPU rather than the CPU (module docstring).

    ``environ`` (default ``os.environ``) and ``plugins`` (default :func:`installed_plugins`)
    are for tests.
    """
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    return bool(installed_plugins() if plugins is None else plugins)


__all__ = ["PLUGIN_MODULES", "accelerator_expected", "installed_plugins"]
