"""JAX's persistent compilation cache for jaxvae's programs: a second start compiles nothing.

``train.py``, :func:`jaxvae.train_lib.train_and_evaluate` and the workdir entry points of
:mod:`jaxvae.inference` (all through :func:`jaxvae.run_setup.setup`) call :func:`enable`
before they compile anything. Compiled programs are then stored in one folder shared by all
runs of all configs, keyed by JAX on the program, the devices and the library versions, so a
run that starts the same programs again loads them instead of compiling.

- Folder: ``$JAXVAE_COMPILATION_CACHE``, or ``$XDG_CACHE_HOME/jaxvae/jax`` (by default
  ``~/.cache/jaxvae/jax``). Delete it at any time to reclaim its space.
- Off: ``JAXVAE_COMPILATION_CACHE=off`` (or ``0``, ``none``, ``false``, empty).
- A cache folder configured for JAX itself (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update("jax_compilation_cache_dir", ...)``) is used as it is.
- Several processes: in one multi-process run only process 0 writes entries (JAX's rule);
  independent runs may share the folder, and an entry that cannot be read (say, one being
  written) makes JAX compile the program instead, with a warning.
- Like any JAX compilation cache it is trusted code: do not point it at a folder that people
  you do not trust can write to.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

ENV = "JAXVAE_COMPILATION_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")


def default_dir() -> Path | None:
    """The folder :func:`enable` uses, or ``None`` when ``$JAXVAE_COMPILATION_CACHE`` turns
    the cache off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxvae" / "jax"


def enable() -> Path | None:
    """Turns JAX's persistent compilation cache on (module docstring); returns its folder.

    Every program is cached, however quickly it compiled: a start is many small compiles.
    A folder that cannot be created leaves the cache off (the run compiles as usual).
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    folder = default_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process whether the cache is in use, at the first compilation:
    # start afresh, in case something was compiled before (a notebook, a test).
    jax_cache.reset_cache()
    return folder


__all__ = ["ENV", "default_dir", "enable"]
