"""jaxvae.backend: which platform JAX will compute on, answered before JAX starts."""

import sys

import pytest

from jaxvae import backend


@pytest.mark.parametrize("platforms", ["cuda", "tpu", "rocm", "gpu", "cuda,cpu", " TPU "])
def test_jax_platforms_naming_an_accelerator_first(platforms):
    assert backend.accelerator_expected({"JAX_PLATFORMS": platforms}, plugins=())


@pytest.mark.parametrize("platforms", ["cpu", "CPU", "cpu,cuda"])
def test_jax_platforms_cpu_wins_over_installed_plugins(platforms):
    """Asked for CPU explicitly (the tests do), JAX computes on the CPU."""
    environ = {"JAX_PLATFORMS": platforms}
    assert not backend.accelerator_expected(environ, plugins=("jax_cuda12_plugin",))


def test_without_jax_platforms_an_installed_plugin_decides():
    assert not backend.accelerator_expected({}, plugins=())
    assert not backend.accelerator_expected({"JAX_PLATFORMS": ""}, plugins=())
    assert backend.accelerator_expected({}, plugins=("libtpu",))


def _write_module(root, relative: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("raise RuntimeError('a plugin must be found, never imported')\n")


def test_plugin_scan_finds_what_jax_would_load(tmp_path, monkeypatch):
    """Top-level plugin modules and the jax_plugins namespace package, none of them imported."""
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.delitem(sys.modules, "jax_plugins", raising=False)  # jax imports it if present
    assert backend.installed_plugins() == set()
    # As the wheels lay them out: jax_cuda12_plugin has no __init__.py, only extensions.
    _write_module(tmp_path, "jax_cuda12_plugin/_versions.cpython-311-x86_64-linux-gnu.so")
    _write_module(tmp_path, "libtpu/__init__.py")
    _write_module(tmp_path, "jax_rocm7_plugin.py")
    _write_module(tmp_path, "jax_plugins/xla_cuda13/__init__.py")  # jax_plugins: a namespace
    _write_module(tmp_path, "unrelated_cuda_plugin/__init__.py")
    found = backend.installed_plugins()
    assert found == {"jax_cuda12_plugin", "libtpu", "jax_rocm7_plugin", "jax_plugins"}
    assert not {"jax_cuda12_plugin", "libtpu", "jax_plugins"} & set(sys.modules)
