"""Experiment configuration: the shared base config, loading, validation and comparison.

Every ``configs/*.py`` starts from :func:`base_config` and changes only what differs, so a
field has one default and one docstring. The config is an ``ml_collections.ConfigDict``;
``train.py`` locks it after command-line overrides so a misspelt field fails loudly.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

OBJECTIVES = ("elbo", "vanilla_vae_loss")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "exponential", "cosine", "warmup_cosine")


class ConfigError(ValueError):
    """A config that cannot be run; the message says which field to change."""


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (dynamically binarized MNIST, Bernoulli likelihood)."""
    c = ml_collections.ConfigDict()
    c.name = "mnist"  # default workdir is runs/<name>
    c.seed = 0  # the whole run (init, noise, data order) is reproducible from it
    c.batch_size = 128  # GLOBAL batch, split over all devices of all processes
    c.num_train_steps = 10_000
    c.log_every_steps = 100  # metrics are fetched from the devices only this often
    c.eval_every_steps = 2_000
    c.checkpoint_every_steps = 1_000
    c.keep_checkpoints = 3  # the latest N are kept, plus the best by test negative ELBO

    # "elbo": maximise the true ELBO, beta * KL with a linear warm-up of beta.
    # "vanilla_vae_loss": PyTorch-VAE's objective (pixel-mean MSE + kld_weight * KL).
    c.objective = "elbo"
    c.beta = 1.0
    c.kl_warmup_steps = 0  # beta rises linearly from beta/N to beta over N steps; 0 = off
    c.kld_weight = 0.00025

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist"
    c.data.data_dir = config_dict.placeholder(str)  # tfds data_dir; None = tfds default
    c.data.manual_dir = config_dict.placeholder(str)  # folder with the original files (offline)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.binarize = "dynamic"  # "dynamic" | "none"
    c.data.pixel_range = "unit"  # "unit" [0, 1] | "symmetric" [-1, 1]
    c.data.image_size = config_dict.placeholder(int)
    c.data.center_crop = config_dict.placeholder(int)
    c.data.in_memory = True
    c.data.shuffle_buffer = 10_000

    c.model = ml_collections.ConfigDict()
    c.model.latent_dim = 32
    c.model.hidden_dims = (32, 64, 128)
    c.model.likelihood = "bernoulli"  # "bernoulli" | "gaussian"
    c.model.output_activation = "none"  # "tanh" | "none" (gaussian only)
    c.model.obs_logvar = 0.0  # fixed log-variance of the Gaussian likelihood
    c.model.conv_impl = "auto"
    c.model.dtype = "float32"  # compute dtype; parameters stay float32

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"  # "adam" | "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "constant"  # "constant" | "exponential" | "cosine" | "warmup_cosine"
    c.optimizer.decay_rate = 0.95  # exponential: lr * decay_rate ** (step // transition_steps)
    c.optimizer.transition_steps = 0  # exponential: 0 = one epoch of steps
    c.optimizer.warmup_steps = 0  # warmup_cosine
    c.optimizer.weight_decay = 0.0  # adamw (decoupled)
    c.optimizer.grad_clip_norm = 0.0  # clip_by_global_norm; 0 = off
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 500  # global; the padded last batch is masked
    c.eval.iwae_samples = 100  # K of the importance-weighted NLL
    c.eval.iwae_chunk_size = 25  # samples decoded at once (memory)
    c.eval.num_image_grid = 8  # images per row of the PNG grids
    c.eval.interpolation_steps = 8
    return c


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Runs ``get_config()`` of a config file (``configs/mnist.py``) and returns its result."""
    path = Path(str(path).split(":", 1)[0])
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_jaxvae_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field: ``["batch_size", "data.name", ...]``."""
    keys = []
    for k in sorted(config.keys()):
        v = config[k]
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(leaf_keys(v, f"{prefix}{k}."))
        else:
            keys.append(f"{prefix}{k}")
    return keys


def override_keys(argv: Sequence[str], flag: str = "config") -> list[str]:
    """The dotted field names set by ``--config.a.b=v`` / ``--config.a.b v`` arguments."""
    head = f"--{flag}."
    return [arg[len(head) :].split("=", 1)[0] for arg in argv if arg.startswith(head)]


def check_override_keys(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
    """Raises :class:`ConfigError` naming an unknown key and listing the valid ones."""
    valid = leaf_keys(config)
    groups = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    for key in keys:
        if key in valid or key in groups:
            continue
        close = difflib.get_close_matches(key, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"Unknown config key {key!r}.{hint}\nValid keys:\n  " + "\n  ".join(valid)
        )


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """JSON-ready nested dict (tuples become lists)."""
    return json.loads(config.to_json())


def from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    """Inverse of :func:`to_dict`: a config from a resolved ``config.json`` (lists -> tuples)."""
    base = base_config()
    merged = _merge(to_dict(base), d)
    c = ml_collections.ConfigDict(_tuples(merged))
    return c


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _tuples(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _tuples(v) for k, v in d.items()}
    if isinstance(d, list):
        return tuple(d)
    return d


def model_signature(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """The fields that fix the parameter tree: ``config.model`` plus the data's image geometry."""
    d = config if isinstance(config, dict) else to_dict(config)
    model = dict(d["model"])
    data = d["data"]
    for k in ("name", "image_size", "center_crop"):
        model[f"data.{k}"] = data.get(k)
    return _tuples(model)


def model_config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines ``field: old -> new`` for the model-defining fields that differ."""
    a, b = model_signature(old), model_signature(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a | b) if a.get(k) != b.get(k)]


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks the fields whose errors would otherwise surface deep inside JAX."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(
        config.objective in OBJECTIVES,
        f"config.objective must be one of {OBJECTIVES}, got {config.objective!r}.",
    )
    need(
        config.optimizer.name in OPTIMIZERS,
        f"config.optimizer.name must be one of {OPTIMIZERS}, got {config.optimizer.name!r}.",
    )
    need(
        config.optimizer.schedule in SCHEDULES,
        f"config.optimizer.schedule must be one of {SCHEDULES}, got {config.optimizer.schedule!r}.",
    )
    need(config.num_train_steps >= 0, "config.num_train_steps must be >= 0.")
    for field in (
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    ):
        need(config[field] >= 1, f"config.{field} must be >= 1, got {config[field]}.")
    need(
        config.batch_size >= 1 and config.batch_size % num_devices == 0,
        f"config.batch_size={config.batch_size} is not divisible by the number of devices "
        f"({num_devices}): the global batch is split evenly over them. Use a multiple of "
        f"{num_devices}, e.g. --config.batch_size="
        f"{max(1, math.ceil(config.batch_size / num_devices)) * num_devices}.",
    )
    # (config.eval.batch_size is rounded up to a multiple of the device count instead: the
    # padding is masked, so it changes no result.)
    need(config.eval.batch_size >= 1, "config.eval.batch_size must be >= 1.")
    need(config.eval.iwae_samples >= 1, "config.eval.iwae_samples must be >= 1.")
    need(config.kl_warmup_steps >= 0, "config.kl_warmup_steps must be >= 0.")


__all__ = [
    "ConfigError",
    "OBJECTIVES",
    "OPTIMIZERS",
    "SCHEDULES",
    "base_config",
    "check_override_keys",
    "from_dict",
    "leaf_keys",
    "load_config_file",
    "model_config_diff",
    "model_signature",
    "override_keys",
    "to_dict",
    "validate",
]
