"""The library modules' ``__all__`` lists match what the modules define."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "jaxvae.losses",
    "jaxvae.models",
    "jaxvae.layers",
    "jaxvae.convert",
    "jaxvae.run_setup",
    "jaxvae.run_outputs",
    "jaxvae.train_lib",
    "jaxvae.inference",
]

# Public functions that are deliberately not exported (command-line entry points).
NOT_EXPORTED = {"jaxvae.convert": {"main"}}


@pytest.mark.parametrize("name", MODULES)
def test_every_name_in_all_exists(name):
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names the module does not define: {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_and_class_is_in_all(name):
    module = importlib.import_module(name)
    defined_here = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == name
    }
    unlisted = sorted(defined_here - set(module.__all__) - NOT_EXPORTED.get(name, set()))
    assert not unlisted, f"public names of {name} missing from its __all__: {unlisted}"
