"""Configs, config validation, optimizer schedules and the KL warm-up (no compilation)."""

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvae import config_utils, optim
from jaxvae.train_step import kl_beta

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


def load(name):
    return config_utils.load_config_file(ROOT / "configs" / f"{name}.py")


def test_all_expected_configs_exist():
    assert {"mnist", "binarized_mnist", "fashion_mnist", "cifar10", "celeba", "tiny"} <= set(
        CONFIGS
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_complete_and_valid(name):
    config = load(name)
    # Every config has exactly the base fields: nothing added, nothing missing.
    assert config_utils.leaf_keys(config) == config_utils.leaf_keys(config_utils.base_config())
    config_utils.validate(config, num_devices=8)
    assert config.objective in config_utils.OBJECTIVES
    # The resolved config survives config.json.
    again = config_utils.from_dict(config_utils.to_dict(config))
    assert config_utils.to_dict(again) == config_utils.to_dict(config)
    assert config_utils.model_config_diff(config_utils.to_dict(config), again) == []


def test_mnist_is_dynamically_binarized_bernoulli():
    c = load("mnist")
    assert (c.data.name, c.data.binarize, c.model.likelihood) == ("mnist", "dynamic", "bernoulli")
    b = load("binarized_mnist")
    assert (b.data.name, b.data.binarize) == ("binarized_mnist", "none")


def test_celeba_is_the_seed_experiment():
    c = load("celeba")
    assert c.seed == 1265 and c.batch_size == 64
    assert (c.data.name, c.data.center_crop, c.data.image_size) == ("celeb_a", 148, 64)
    assert c.data.pixel_range == "symmetric"
    assert c.model.latent_dim == 128 and tuple(c.model.hidden_dims) == (32, 64, 128, 256, 512)
    assert (c.model.likelihood, c.model.output_activation) == ("gaussian", "tanh")
    assert c.objective == "vanilla_vae_loss" and c.kld_weight == 0.00025
    o = c.optimizer
    assert (o.name, o.learning_rate, o.weight_decay) == ("adam", 0.005, 0.0)
    assert (o.schedule, o.decay_rate, o.transition_steps) == ("exponential", 0.95, 0)
    assert c.num_train_steps == -1 and c.num_epochs == 100  # resolved at run time
    assert config_utils.resolve_train_steps(c, 162_770) == math.ceil(100 * 162_770 / 64)


@pytest.mark.parametrize("name", ["mnist", "celeba", "cifar10"])
def test_epochs_do_not_change_with_the_batch_size(name):
    """The same config at two batch sizes trains the same number of epochs (to within a step)."""
    n = 60_000
    small, large = load(name), load(name)
    large.batch_size = 4 * small.batch_size
    s_small = config_utils.resolve_train_steps(small, n)
    s_large = config_utils.resolve_train_steps(large, n)
    assert s_small > s_large
    for c, steps in ((small, s_small), (large, s_large)):
        assert c.num_epochs <= steps * c.batch_size / n < c.num_epochs + c.batch_size / n


def test_num_train_steps_wins_over_epochs():
    c = load("mnist")
    c.num_train_steps = 7
    assert config_utils.resolve_train_steps(c, 60_000) == 7
    c.num_train_steps, c.num_epochs = -1, 0.0
    with pytest.raises(config_utils.ConfigError, match="num_epochs must be > 0"):
        config_utils.validate(c, 1)


def test_unknown_override_key_lists_valid_keys():
    config = load("mnist")
    config_utils.check_override_keys(config, ["batch_size", "model.latent_dim", "optimizer"])
    with pytest.raises(config_utils.ConfigError) as e:
        config_utils.check_override_keys(config, ["model.latnt_dim"])
    msg = str(e.value)
    assert "model.latnt_dim" in msg and "Did you mean model.latent_dim" in msg
    assert "Valid keys:" in msg and "data.manual_dir" in msg and "batch_size" in msg


def test_override_keys_parses_both_flag_forms():
    argv = ["train.py", "--config", "c.py", "--config.a.b=1", "--config.c", "2", "--workdir=x"]
    assert config_utils.override_keys(argv) == ["a.b", "c"]


def test_batch_not_divisible_by_devices_names_the_fix():
    config = load("mnist")
    config.batch_size = 100
    with pytest.raises(config_utils.ConfigError, match=r"batch_size=100 .*8.*batch_size=104"):
        config_utils.validate(config, num_devices=8)


@pytest.mark.parametrize(
    ("objective", "estimator", "prior", "match"),
    [
        ("elbo", "dreg", "standard", r"gradient_estimator='dreg' does not apply to .*'elbo'"),
        ("iwae", "stl", "standard", r"'stl' goes with --config.objective=elbo"),
        ("vanilla_vae_loss", "stl", "standard", r"takes 'standard':"),
        ("elbo", "rws", "standard", r"gradient_estimator='rws' .* one of 'standard', 'stl', "),
        ("vanilla_vae_loss", "standard", "vamp", r"prior='vamp' needs .*--config.objective=elbo"),
        ("elbo", "standard", "gmm", r"model.prior='gmm' .* one of 'standard', 'vamp'"),
    ],
)
def test_estimator_and_prior_combinations_are_validated(objective, estimator, prior, match):
    """One line naming the valid combination; the valid ones pass."""
    config = load("mnist")
    config.objective, config.gradient_estimator, config.model.prior = objective, estimator, prior
    with pytest.raises(config_utils.ConfigError, match=match) as e:
        config_utils.validate(config, 1)
    assert "\n" not in str(e.value)
    for objective, estimators in config_utils.GRADIENT_ESTIMATORS.items():
        for estimator in estimators:
            config = load("mnist")
            config.objective, config.gradient_estimator = objective, estimator
            config_utils.validate(config, 1)
    config = load("mnist_vamp")
    config.model.num_pseudo_inputs = 0
    with pytest.raises(config_utils.ConfigError, match="num_pseudo_inputs=0 .* >= 1"):
        config_utils.validate(config, 1)


def _flat(config) -> dict:
    return {k: config_utils._get(config, k) for k in config_utils.leaf_keys(config)}


def test_option_configs_change_only_their_options():
    def diff(a, b):
        fa, fb = _flat(load(a)), _flat(load(b))
        return {k: fb[k] for k in fa if fa[k] != fb[k]}

    assert diff("mnist_iwae", "mnist_iwae_dreg") == {
        "name": "mnist_iwae_dreg",
        "gradient_estimator": "dreg",
    }
    assert diff("mnist_nll", "mnist_vamp") == {"name": "mnist_vamp", "model.prior": "vamp"}
    assert diff("mnist_iwae_dreg", "mnist_iwae_vamp_dreg") == {
        "name": "mnist_iwae_vamp_dreg",
        "model.prior": "vamp",
        "num_epochs": 50.0,  # the VampPrior's step costs ~2.5x: the recipe of the 83.14 nats
    }
    assert load("mnist_vamp").model.num_pseudo_inputs == 500


def test_model_signature_of_the_prior():
    """A config.json written before the prior existed is the standard prior's (old workdirs
    stay usable); the prior is part of the model; the number of pseudo-inputs is, for "vamp"."""
    new = config_utils.to_dict(load("tiny"))
    old = config_utils.to_dict(load("tiny"))
    del old["model"]["prior"], old["model"]["num_pseudo_inputs"]
    assert config_utils.model_config_diff(old, new) == []
    new["model"]["num_pseudo_inputs"] = 7  # ignored by the standard prior
    assert config_utils.model_config_diff(old, new) == []
    new["model"]["prior"] = "vamp"
    assert config_utils.model_config_diff(old, new) == [
        "num_pseudo_inputs: None -> 7",
        "prior: 'standard' -> 'vamp'",
    ]


def test_model_config_diff_names_changed_fields():
    a = config_utils.to_dict(load("tiny"))
    b = config_utils.to_dict(load("tiny"))
    b["model"]["latent_dim"] = 5
    b["batch_size"] = 32  # not a model field
    assert config_utils.model_config_diff(a, b) == ["latent_dim: 4 -> 5"]


# ---- optimizer and schedules ----


def test_exponential_schedule_is_per_epoch_staircase():
    opt = load("celeba").optimizer
    sched = optim.learning_rate_schedule(opt, num_train_steps=10_000, steps_per_epoch=100)
    for step, epochs in [(0, 0), (99, 0), (100, 1), (250, 2), (1000, 10)]:
        np.testing.assert_allclose(float(sched(step)), 0.005 * 0.95**epochs, rtol=1e-6)


def test_cosine_and_warmup_cosine_schedules():
    opt = load("mnist").optimizer
    opt.schedule = "cosine"
    s = optim.learning_rate_schedule(opt, 100, 10)
    np.testing.assert_allclose(float(s(50)), 1e-3 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(s(100)), 0.0, atol=1e-9)
    opt.schedule, opt.warmup_steps = "warmup_cosine", 10
    s = optim.learning_rate_schedule(opt, 110, 10)
    np.testing.assert_allclose(
        [float(s(0)), float(s(5)), float(s(10))], [0.0, 5e-4, 1e-3], rtol=1e-5, atol=1e-9
    )
    np.testing.assert_allclose(float(s(60)), 5e-4, rtol=1e-5)


def _one_update(opt, grads, params):
    tx, _ = optim.create_optimizer(opt, 100, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_optimizer_clipping_and_weight_decay():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([3.0, 4.0])}  # global norm 5
    opt = load("mnist").optimizer
    # Adam's first update is -lr * sign(g) (bias-corrected m/sqrt(v) = g/|g|, up to eps).
    np.testing.assert_allclose(_one_update(opt, grads, params)["w"], [-1e-3, -1e-3], rtol=1e-5)
    # With clipping to norm 1, Adam's first moment sees the clipped gradient (0.6, 0.8).
    opt.grad_clip_norm = 1.0
    tx, _ = optim.create_optimizer(opt, 100, 10)
    clip = optax.clip_by_global_norm(1.0)
    clipped, _ = clip.update(grads, clip.init(params))
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-6)
    st = tx.init(params)
    _, st = tx.update(grads, st, params)
    inner = st[1][0]  # adam's ScaleByAdamState after the clip
    np.testing.assert_allclose(inner.mu["w"], 0.1 * np.array([0.6, 0.8]), rtol=1e-5)
    # AdamW: decoupled decay lr * wd * w is added to the Adam step.
    opt = load("mnist").optimizer
    opt.name, opt.weight_decay = "adamw", 0.1
    u = _one_update(opt, grads, params)["w"]
    np.testing.assert_allclose(u, [-1e-3 - 1e-4 * 1.0, -1e-3 - 1e-4 * -2.0], rtol=1e-4)


def test_kl_warmup_is_linear():
    betas = [float(kl_beta(jnp.asarray(s), 2.0, 4)) for s in range(6)]
    np.testing.assert_allclose(betas, [0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert float(kl_beta(jnp.asarray(0), 1.0, 0)) == 1.0


def test_images_per_second_excludes_first_window():
    from jaxvae.reporting import Timer

    t = Timer()
    t.mark(100)  # compile window: ignored
    t.seconds, t.images = 2.0, 50
    assert math.isclose(t.images_per_second, 25.0)
