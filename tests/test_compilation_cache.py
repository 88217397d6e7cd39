"""jaxvae.compilation_cache: where the cache lives, how it is turned off, and that a second
process start loads its programs instead of compiling them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jaxvae import compilation_cache

ROOT = Path(__file__).resolve().parents[1]

# A process that enables the cache, compiles a small training-like program and prints how many
# programs it had to compile (JAX's cache-miss events; a program loaded from the cache is a hit).
_SCRIPT = """
import jax, jax.numpy as jnp
from jaxvae import compilation_cache, losses
compiles = []
jax.monitoring.register_event_listener(
    lambda event, **kw: compiles.append(event)
    if event == "/jax/compilation_cache/cache_misses" else None
)
folder = compilation_cache.enable()
f = jax.jit(jax.grad(lambda m: losses.gaussian_kl(m, jnp.zeros(3)).sum()))
f(jnp.ones(3)).block_until_ready()
print(folder, len(compiles))
"""


def test_default_folder_and_switch(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.default_dir() == tmp_path / "jaxvae" / "jax"
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "mine"))
    assert compilation_cache.default_dir() == tmp_path / "mine"
    for off in ("off", "0", "", "None"):
        monkeypatch.setenv(compilation_cache.ENV, off)
        assert compilation_cache.default_dir() is None


def _start(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    folder, count = out.stdout.split()
    return folder, int(count)


def test_second_start_compiles_nothing_and_off_means_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", JAXVAE_COMPILATION_CACHE=str(tmp_path / "c"))
    first, second = _start(env), _start(env)
    assert first == (str(tmp_path / "c"), first[1]) and first[1] >= 1
    assert second == (first[0], 0)  # every program came from the cache
    assert any((tmp_path / "c").iterdir())
    env["JAXVAE_COMPILATION_CACHE"] = "off"
    assert _start(env) == ("None", 0)  # off: no cache, so no cache misses either
