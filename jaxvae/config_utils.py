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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from jaxvae import layers, losses, models
from jaxvae.data import transforms

OBJECTIVES = ("elbo", "iwae", "vanilla_vae_loss")
# config.gradient_estimator values each objective accepts (the losses define them).
GRADIENT_ESTIMATORS = {
    "elbo": losses.ELBO_GRADIENT_ESTIMATORS,
    "iwae": losses.IWAE_GRADIENT_ESTIMATORS,
    "vanilla_vae_loss": ("standard",),
}
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
    # Length of the run: num_train_steps when >= 0, else num_epochs passes over the training
    # split, resolved to steps at run time from the split's size and the global batch (so a
    # different batch_size trains the same number of epochs). 20 epochs = 9,375 steps here.
    c.num_train_steps = -1
    c.num_epochs = 20.0
    c.log_every_steps = 100  # metrics are fetched from the devices only this often
    c.eval_every_steps = 2_000
    c.checkpoint_every_steps = 1_000
    c.keep_checkpoints = 3  # the latest N are kept, plus the best by test negative ELBO

    # "elbo": maximise the true ELBO, beta * KL with a linear warm-up of beta.
    # "iwae": maximise the importance-weighted bound with iwae_samples samples (Burda et al.);
    #   it costs about iwae_samples decoder passes per image; beta/kl_warmup do not apply.
    # "vanilla_vae_loss": PyTorch-VAE's objective (pixel-mean MSE + kld_weight * KL).
    c.objective = "elbo"
    c.iwae_samples = 5  # K of objective="iwae" (training); eval.iwae_samples is the test's K
    c.beta = 1.0
    c.kl_warmup_steps = 0  # beta rises linearly from beta/N to beta over N steps; 0 = off
    c.kld_weight = 0.00025
    # How the objective's gradient is estimated (its value is the same): "standard" (the
    # reparameterisation gradient), "dreg" (doubly reparameterised, objective="iwae" only;
    # Tucker et al. 2018) or "stl" (sticking the landing, objective="elbo" only; Roeder et
    # al. 2017). See jaxvae.losses.iwae_bound and jaxvae.losses.elbo.
    c.gradient_estimator = "standard"

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
    # Decoder options for likelihood experiments (models.VAE); the defaults are VanillaVAE's.
    c.model.decoder_type = "conv"  # "conv" | "mlp"
    c.model.decoder_hidden_dims = ()  # () = mirror hidden_dims; else the decoder's own widths
    # "standard": N(0, I) (VanillaVAE's). "vamp": the VampPrior (Tomczak & Welling 2018), a
    # mixture of the encoder's posteriors at num_pseudo_inputs learned images (models.VAE);
    # objective "elbo" or "iwae" only.
    c.model.prior = "standard"
    c.model.num_pseudo_inputs = 500  # M of prior="vamp"

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
    c.eval.iwae_chunk_size = 0  # upper bound on the samples per decoder call; 0 = no bound
    # Decoder working set per device in the IWAE evaluation (MiB): the decoder calls are sized
    # from it (jaxvae.evaluate.iwae_plan), whatever K and the chunk size; the estimate is the same.
    c.eval.memory_mb = 512.0
    c.eval.num_image_grid = 8  # images per row of the PNG grids (1 to 64)
    c.eval.interpolation_steps = 8  # images per interpolation row (2 to 64)
    return c


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Runs ``get_config()`` of a config file (``configs/mnist.py``) and returns its result.

    ``file.py:arg`` calls ``get_config("arg")``, as ml_collections' ``--config`` flag does.
    Raises :class:`ConfigError` (one message, no traceback to read) when the file is missing,
    fails to run, has no ``get_config`` or returns something that is not a ConfigDict.
    """
    path, *arg = str(path).split(":", 1)
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"Config file {str(path)!r} {what} (e.g. --config configs/mnist.py).")
    spec = importlib.util.spec_from_file_location(f"_jaxvae_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"Config file {str(path)!r} defines no get_config().")
        config = module.get_config(*arg)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's file: report whatever it raised
        raise ConfigError(f"Config file {str(path)!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config() of {str(path)!r} returned {type(config).__name__}, not a ConfigDict."
        )
    return config


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
    """Inverse of :func:`to_dict`: a config from a resolved ``config.json`` (lists -> tuples).

    The values are assigned onto :func:`base_config`, so its typed fields stay typed: an unset
    placeholder (``data.data_dir``: null) can still be overridden (``--config.data.data_dir=``).
    """
    config = base_config()
    _assign(config, _tuples(d))
    return config


def _assign(config: ml_collections.ConfigDict, values: dict) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(config.get(k), ml_collections.ConfigDict):
            _assign(config[k], v)
        else:
            config[k] = v


def _tuples(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _tuples(v) for k, v in d.items()}
    if isinstance(d, list):
        return tuple(d)
    return d


def model_signature(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """The fields that fix the parameter tree: ``config.model`` plus the data's image geometry.

    A field missing from ``config`` (a ``config.json`` written before the field existed) has
    its default; ``num_pseudo_inputs`` counts only for ``prior="vamp"``.
    """
    d = config if isinstance(config, dict) else to_dict(config)
    model = {**to_dict(base_config())["model"], **d["model"]}
    if model["prior"] != "vamp":
        del model["num_pseudo_inputs"]
    data = d["data"]
    for k in ("name", "image_size", "center_crop"):
        model[f"data.{k}"] = data.get(k)
    return _tuples(model)


def model_config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines ``field: old -> new`` for the model-defining fields that differ."""
    a, b = model_signature(old), model_signature(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a | b) if a.get(k) != b.get(k)]


def resolve_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """The run's number of steps: ``num_train_steps``, or ``num_epochs`` rounded up to a step.

    ``num_train_steps = -1`` means "use ``num_epochs``": ``ceil(num_epochs * N / batch_size)``
    for a training split of ``N`` examples, so a run says how long it trains in the unit that
    stays meaningful when the batch size changes (as flax's imagenet example does).
    """
    if config.num_train_steps >= 0:
        return int(config.num_train_steps)
    return max(1, math.ceil(config.num_epochs * num_train_examples / config.batch_size - 1e-9))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# field -> (check, what is allowed). Every leaf of base_config() has an entry (a test checks).
_INT_GE = lambda lo: (lambda v: _is_int(v) and v >= lo, f"an integer >= {lo}")  # noqa: E731
_INT_IN = lambda lo, hi: (  # noqa: E731
    lambda v: _is_int(v) and lo <= v <= hi,
    f"an integer from {lo} to {hi}",
)
_NUM_GE = lambda lo: (lambda v: _is_number(v) and v >= lo, f"a finite number >= {lo}")  # noqa: E731
_ONE_OF = lambda *c: (lambda v: v in c, f"one of {', '.join(map(repr, c))}")  # noqa: E731
_OPT_INT_GE = lambda lo: (  # noqa: E731
    lambda v: v is None or (_is_int(v) and v >= lo),
    f"unset or an integer >= {lo}",
)
_OPT_STR = (lambda v: v is None or isinstance(v, str), "unset or a path")
_NONEMPTY_STR = (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")

FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (
        lambda v: isinstance(v, str) and v.strip() != "" and "/" not in v and v not in (".", ".."),
        "a non-empty name without '/' (it names the default workdir runs/<name>)",
    ),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**31, "an integer in [0, 2**31)"),
    "batch_size": _INT_GE(1),
    "num_train_steps": _INT_GE(-1),
    "num_epochs": _NUM_GE(0),
    "log_every_steps": _INT_GE(1),
    "eval_every_steps": _INT_GE(1),
    "checkpoint_every_steps": _INT_GE(1),
    "keep_checkpoints": _INT_GE(1),
    "objective": _ONE_OF(*OBJECTIVES),
    "iwae_samples": _INT_GE(1),
    "beta": _NUM_GE(0),
    "kl_warmup_steps": _INT_GE(0),
    "kld_weight": _NUM_GE(0),
    "gradient_estimator": _ONE_OF(*dict.fromkeys(sum(GRADIENT_ESTIMATORS.values(), ()))),
    "data.name": _NONEMPTY_STR,
    "data.data_dir": _OPT_STR,
    "data.manual_dir": _OPT_STR,
    "data.train_split": _NONEMPTY_STR,
    "data.eval_split": _NONEMPTY_STR,
    "data.binarize": _ONE_OF(*transforms.BINARIZE_OPTIONS),
    "data.pixel_range": _ONE_OF(*transforms.PIXEL_RANGES),
    "data.image_size": _OPT_INT_GE(1),
    "data.center_crop": _OPT_INT_GE(1),
    "data.in_memory": (lambda v: isinstance(v, bool), "True or False"),
    "data.shuffle_buffer": _INT_GE(1),
    "model.latent_dim": _INT_GE(1),
    "model.hidden_dims": (
        lambda v: (
            isinstance(v, tuple | list) and len(v) >= 1 and all(_is_int(h) and h >= 1 for h in v)
        ),
        'a non-empty tuple of positive integers, e.g. --config.model.hidden_dims="(32,64,128)"',
    ),
    "model.decoder_type": _ONE_OF(*models.DECODERS),
    "model.decoder_hidden_dims": (
        lambda v: isinstance(v, tuple | list) and all(_is_int(h) and h >= 1 for h in v),
        'a tuple of positive integers, e.g. --config.model.decoder_hidden_dims="(16,32)", or () '
        "to mirror model.hidden_dims",
    ),
    "model.likelihood": _ONE_OF(*models.LIKELIHOODS),
    "model.output_activation": _ONE_OF(*models.OUTPUT_ACTIVATIONS),
    "model.obs_logvar": (_is_number, "a finite number"),
    "model.conv_impl": _ONE_OF(*layers.IMPLS),
    "model.dtype": _ONE_OF("float32", "bfloat16"),
    "model.prior": _ONE_OF(*models.PRIORS),
    "model.num_pseudo_inputs": _INT_GE(1),
    "optimizer.name": _ONE_OF(*OPTIMIZERS),
    "optimizer.learning_rate": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "optimizer.schedule": _ONE_OF(*SCHEDULES),
    "optimizer.decay_rate": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "optimizer.transition_steps": _INT_GE(0),
    "optimizer.warmup_steps": _INT_GE(0),
    "optimizer.weight_decay": _NUM_GE(0),
    "optimizer.grad_clip_norm": _NUM_GE(0),
    "optimizer.b1": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optimizer.b2": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "eval.batch_size": _INT_GE(1),
    "eval.iwae_samples": _INT_GE(1),
    "eval.iwae_chunk_size": _INT_GE(0),
    "eval.memory_mb": (lambda v: _is_number(v) and v > 0, "a number of MiB > 0"),
    # The pictures are one program on one device: a grid of num_image_grid**2 prior samples,
    # and num_image_grid rows of interpolation_steps decodes (a 64 x 64 grid: 4,096 samples).
    "eval.num_image_grid": _INT_IN(1, 64),
    "eval.interpolation_steps": _INT_IN(2, 64),
}


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks every field's type and range, and the combinations that matter, before any work.

    Raises :class:`ConfigError` with one message naming the field, the value and what is
    allowed. Checks that need the dataset (a crop larger than its images, a split it does
    not have) are made by ``jaxvae.input_pipeline.get_dataset_info``.
    """

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for field, (ok, allowed) in FIELD_RULES.items():
        try:
            value = _get(config, field)
        except (KeyError, AttributeError):
            continue  # a field this config does not have (configs may drop none; see the test)
        need(
            ok(value),
            f"config.{field}={value!r} is not allowed: it must be {allowed} "
            f"(set it with --config.{field}=...).",
        )
    need(
        config.num_train_steps >= 0 or config.num_epochs > 0,
        f"config.num_epochs must be > 0 when config.num_train_steps is -1; got "
        f"{config.num_epochs}.",
    )
    need(
        config.batch_size % num_devices == 0,
        f"config.batch_size={config.batch_size} is not divisible by the number of devices "
        f"({num_devices}): the global batch is split evenly over them. Use a multiple of "
        f"{num_devices}, e.g. --config.batch_size="
        f"{max(1, math.ceil(config.batch_size / num_devices)) * num_devices}.",
    )
    # (config.eval.batch_size is rounded up to a multiple of the device count instead: the
    # padding is masked, so it changes no result.)
    need(
        config.model.likelihood != "bernoulli" or config.data.pixel_range == "unit",
        "config.model.likelihood='bernoulli' models pixels in [0, 1], but "
        f"config.data.pixel_range={config.data.pixel_range!r}; use --config.data.pixel_range=unit "
        "or --config.model.likelihood=gaussian.",
    )
    need(
        config.model.output_activation == "none" or config.model.likelihood == "gaussian",
        "config.model.output_activation='tanh' only applies to the Gaussian likelihood (the "
        "Bernoulli decoder outputs logits); use --config.model.output_activation=none.",
    )
    need(
        config.model.output_activation != "tanh" or config.data.pixel_range == "symmetric",
        "config.model.output_activation='tanh' produces values in [-1, 1]; it needs "
        "--config.data.pixel_range=symmetric.",
    )
    need(
        config.objective != "iwae" or (config.beta == 1.0 and config.kl_warmup_steps == 0),
        "config.objective='iwae' optimises the importance-weighted bound, which has no KL "
        f"weight: got beta={config.beta} and kl_warmup_steps={config.kl_warmup_steps}; use "
        "--config.beta=1 --config.kl_warmup_steps=0 (or --config.objective=elbo for a "
        "weighted KL).",
    )
    estimators = GRADIENT_ESTIMATORS[config.objective]
    need(
        config.gradient_estimator in estimators,
        f"config.gradient_estimator={config.gradient_estimator!r} does not apply to "
        f"config.objective={config.objective!r}, which takes "
        f"{' or '.join(map(repr, estimators))}: 'stl' goes with --config.objective=elbo, 'dreg' "
        "with --config.objective=iwae.",
    )
    need(
        config.model.prior == "standard" or config.objective in ("elbo", "iwae"),
        f"config.model.prior={config.model.prior!r} needs a likelihood objective, got "
        f"config.objective={config.objective!r} (its KL is to N(0, I)); use "
        "--config.objective=elbo or --config.objective=iwae.",
    )
    need(
        config.model.decoder_type != "mlp" or len(config.model.decoder_hidden_dims) > 0,
        "config.model.decoder_type='mlp' needs its hidden widths, e.g. "
        '--config.model.decoder_hidden_dims="(512,512)".',
    )
    need(
        config.optimizer.schedule != "warmup_cosine" or config.optimizer.warmup_steps > 0,
        "config.optimizer.schedule='warmup_cosine' needs --config.optimizer.warmup_steps > 0.",
    )


# Fields a resumed run must share with the run that wrote the checkpoints: they fix the data
# order and the meaning of the saved data position.
RESUME_FIELDS = ("seed", "batch_size", "data.name", "data.train_split", "data.binarize")


def resume_config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines ``field: old -> new`` for the :data:`RESUME_FIELDS` that differ."""

    def get(d: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            d = d.get(part, {}) if isinstance(d, dict) else None
        return d

    return [
        f"{k}: {get(old, k)!r} -> {get(new, k)!r}"
        for k in RESUME_FIELDS
        if get(old, k) != get(new, k)
    ]


__all__ = [
    "ConfigError",
    "GRADIENT_ESTIMATORS",
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
    "resolve_train_steps",
    "resume_config_diff",
    "to_dict",
    "validate",
]
