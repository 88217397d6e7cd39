"""jaxvae.convert: PyTorch-VAE VanillaVAE import, checked against a PyTorch fixture (no torch).

The fixture (tests/fixtures/vanilla_vae_parity.npz) is written by scripts/make_parity_fixture.py:
a VanillaVAE with hidden dims (8, 16), latent 4 and 16x16x3 images, i.e. a 16 x 4 x 4 bottleneck,
so a wrong flatten order could not pass.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvae import convert, losses
from jaxvae.models import VAE, count_params

FIXTURE = Path(__file__).parent / "fixtures" / "vanilla_vae_parity.npz"
ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def torch_state_dict(fx, prefix="sd/"):
    return {k[len(prefix) :]: v for k, v in fx.items() if k.startswith(prefix)}


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def forward_with_eps(m, x, eps, train):
    """The fixture's forward: z = mu + exp(log_var / 2) * eps with the saved eps."""
    mean, logvar = m.encode(x, train=train)
    return m.decode(mean + jnp.exp(0.5 * logvar) * eps, train=train), mean, logvar


def forward(model, variables, x, eps, train=False):
    """``forward_with_eps`` as one compiled program (op by op, every primitive of the model
    would be compiled on its own); in train mode also the BatchNorm updates."""
    mutable = ["batch_stats"] if train else False
    apply = functools.partial(model.apply, method=forward_with_eps, mutable=mutable)
    return jax.jit(apply, static_argnums=3)(variables, x, eps, train)


@pytest.fixture(scope="module")
def converted(fixture):
    return convert.load_pytorch_vanilla_vae(torch_state_dict(fixture), image_size=16)


def test_inferred_config(fixture, converted):
    model, _ = converted
    assert model.hidden_dims == tuple(fixture["hidden_dims"]) == (8, 16)
    assert model.latent_dim == int(fixture["latent_dim"]) == 4
    assert model.image_shape == (16, 16, 3)
    assert (model.likelihood, model.output_activation) == ("gaussian", "tanh")


@pytest.mark.parametrize("conv_impl", ["xla", "auto"])
def test_eval_and_train_mode_match_pytorch(fixture, converted, conv_impl):
    model, variables = converted
    model = model.clone(conv_impl=conv_impl)
    x, eps = jnp.asarray(nhwc(fixture["x"])), jnp.asarray(fixture["eps"])

    out, mean, logvar = forward(model, variables, x, eps)
    np.testing.assert_allclose(out, nhwc(fixture["eval_recons"]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(mean, fixture["eval_mu"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logvar, fixture["eval_log_var"], atol=ATOL, rtol=0)

    (out, mean, logvar), _ = forward(model, variables, x, eps, train=True)
    np.testing.assert_allclose(out, nhwc(fixture["train_recons"]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(mean, fixture["train_mu"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logvar, fixture["train_log_var"], atol=ATOL, rtol=0)

    # The seed's loss on the train-mode forward.
    loss, metrics = losses.vanilla_vae_loss(
        out, x, mean, logvar, kld_weight=float(fixture["kld_weight"])
    )
    np.testing.assert_allclose(loss, fixture["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["reconstruction_loss"], fixture["recons_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], fixture["kld"], rtol=1e-5)


BN_LAYERS = {  # PyTorch BatchNorm -> (our path, elements per channel n = batch * H * W)
    "encoder.0.1": (("encoder", "bn_0"), 4 * 8 * 8),
    "encoder.1.1": (("encoder", "bn_1"), 4 * 4 * 4),
    "decoder.0.1": (("decoder", "bn_0"), 4 * 8 * 8),
    "final_layer.1": (("decoder", "final_bn"), 4 * 16 * 16),
}


def test_running_statistics_after_one_train_step(fixture, converted):
    """running_mean matches PyTorch. running_var follows each framework's own rule:
    PyTorch: v' = 0.9 v + 0.1 * s2_unbiased;  Flax: v' = 0.9 v + 0.1 * s2_biased,
    s2_biased = s2_unbiased * (n - 1) / n. The PyTorch batch variance is recovered from its
    running_var update, so Flax's value is checked against Flax's rule applied to PyTorch's batch,
    and it is checked to differ from PyTorch's by the predicted amount."""
    model, variables = converted
    x, eps = jnp.asarray(nhwc(fixture["x"])), jnp.asarray(fixture["eps"])
    _, updates = forward(model, variables, x, eps, train=True)
    stats = updates["batch_stats"]
    after_keys = {k for k in fixture if k.startswith("after/") and k.endswith(".running_mean")}
    assert {f"after/{name}.running_mean" for name in BN_LAYERS} == after_keys
    for torch_name, ((part, name), n) in BN_LAYERS.items():
        before_var = fixture[f"sd/{torch_name}.running_var"].astype(np.float64)
        after_mean = fixture[f"after/{torch_name}.running_mean"]
        after_var = fixture[f"after/{torch_name}.running_var"]
        assert int(fixture[f"after/{torch_name}.num_batches_tracked"]) == 1

        np.testing.assert_allclose(stats[part][name]["mean"], after_mean, atol=ATOL, rtol=0)
        unbiased = (after_var - 0.9 * before_var) / 0.1
        flax_rule = 0.9 * before_var + 0.1 * unbiased * (n - 1) / n
        np.testing.assert_allclose(stats[part][name]["var"], flax_rule, atol=ATOL, rtol=0)
        gap = after_var - np.asarray(stats[part][name]["var"], np.float64)
        np.testing.assert_allclose(gap, 0.1 * unbiased / n, atol=ATOL, rtol=0)
    # The difference is visible at the smallest layer (n = 64): > 10x the tolerance.
    torch_var = fixture["after/encoder.1.1.running_var"]
    assert np.abs(torch_var - stats["encoder"]["bn_1"]["var"]).max() > 10 * ATOL


def naive_variables(fx):
    """A conversion with the classic bug: Linear weights transposed without reordering
    PyTorch's (c, h, w) flatten into Flax's (h, w, c)."""
    sd = torch_state_dict(fx)
    _, good = convert.load_pytorch_vanilla_vae(sd, image_size=16)
    bad = jax.tree.map(lambda a: a, good)
    for name in ("fc_mu", "fc_var"):
        bad["params"]["encoder"][name]["kernel"] = jnp.asarray(sd[f"{name}.weight"].T)
    bad["params"]["decoder"]["decoder_input"] = {
        "kernel": jnp.asarray(sd["decoder_input.weight"].T),
        "bias": jnp.asarray(sd["decoder_input.bias"]),
    }
    return bad


def test_parity_test_detects_a_flatten_order_bug(fixture, converted):
    model, _ = converted
    x, eps = jnp.asarray(nhwc(fixture["x"])), jnp.asarray(fixture["eps"])
    out, mean, _ = forward(model, naive_variables(fixture), x, eps)
    assert np.abs(mean - fixture["eval_mu"]).max() > 100 * ATOL
    assert np.abs(out - nhwc(fixture["eval_recons"])).max() > 100 * ATOL


def test_lightning_prefix_and_num_batches_tracked_are_accepted(fixture, converted):
    sd = torch_state_dict(fixture)
    assert any(k.endswith("num_batches_tracked") for k in sd)
    lightning = {f"model.{k}": v for k, v in sd.items()}
    _, variables = convert.load_pytorch_vanilla_vae(lightning, image_size=16)
    jax.tree.map(np.testing.assert_array_equal, variables, converted[1])


# ---------------------------------------------------------------------------
# Full-size (the seed) and bad input, without torch
# ---------------------------------------------------------------------------


def seed_state_dict_shapes(hidden, latent, channels, b_hw):
    """The seed VanillaVAE's state_dict shapes, written from its __init__ (independently of
    jaxvae.convert's own table)."""
    flat = hidden[-1] * b_hw[0] * b_hw[1]
    shapes, cin = {}, channels

    def bn(prefix, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{s}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    for i, h in enumerate(hidden):
        shapes[f"encoder.{i}.0.weight"], shapes[f"encoder.{i}.0.bias"] = (h, cin, 3, 3), (h,)
        bn(f"encoder.{i}.1", h)
        cin = h
    for name in ("fc_mu", "fc_var"):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (latent, flat), (latent,)
    shapes["decoder_input.weight"], shapes["decoder_input.bias"] = (flat, latent), (flat,)
    rev = hidden[::-1]
    for i in range(len(rev) - 1):
        shapes[f"decoder.{i}.0.weight"] = (rev[i], rev[i + 1], 3, 3)
        shapes[f"decoder.{i}.0.bias"] = (rev[i + 1],)
        bn(f"decoder.{i}.1", rev[i + 1])
    shapes["final_layer.0.weight"], shapes["final_layer.0.bias"] = (rev[-1], rev[-1], 3, 3), (32,)
    bn("final_layer.1", rev[-1])
    shapes["final_layer.3.weight"], shapes["final_layer.3.bias"] = (3, rev[-1], 3, 3), (3,)
    return shapes


def random_state_dict(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: (np.array(0, np.int64) if s == () else rng.normal(size=s).astype(np.float32))
        for k, s in shapes.items()
    }


SEED_SHAPES = seed_state_dict_shapes((32, 64, 128, 256, 512), 128, 3, (2, 2))


def test_full_size_seed_state_dict_converts_with_the_seed_parameter_count():
    sd = random_state_dict(SEED_SHAPES)
    trainable = sum(
        math.prod(s)
        for k, s in SEED_SHAPES.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert trainable == 3_937_635
    model, variables = convert.load_pytorch_vanilla_vae(sd)  # default image size 64
    assert model == VAE(latent_dim=128, image_shape=(64, 64, 3))
    assert count_params(variables["params"]) == trainable
    assert count_params(variables["batch_stats"]) == sum(
        math.prod(s) for k, s in SEED_SHAPES.items() if "running" in k
    )
    # Spot checks of the layouts on the full-size model.
    np.testing.assert_array_equal(
        variables["params"]["decoder"]["conv_transpose_0"]["kernel"][1, 2, 5, 7],
        sd["decoder.0.0.weight"][7, 5, 1, 2],
    )
    np.testing.assert_array_equal(
        variables["params"]["encoder"]["conv_4"]["kernel"][0, 1, 3, 9],
        sd["encoder.4.0.weight"][9, 3, 0, 1],
    )
    # fc_mu: Flax row (h, w, c) = (1, 0, 5) is PyTorch column c * 4 + h * 2 + w.
    np.testing.assert_array_equal(
        variables["params"]["encoder"]["fc_mu"]["kernel"][(1 * 2 + 0) * 512 + 5, 3],
        sd["fc_mu.weight"][3, 5 * 4 + 1 * 2 + 0],
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["decoder"]["final_bn"]["var"], sd["final_layer.1.running_var"]
    )


def test_image_size_must_match_the_bottleneck():
    sd = random_state_dict(SEED_SHAPES)
    # 60x60 also has a 2x2 bottleneck with 5 levels; 32 does not.
    model, _ = convert.load_pytorch_vanilla_vae(sd, image_size=60)
    assert model.image_shape == (60, 60, 3)
    with pytest.raises(ValueError, match=r"in_features 2048.*32x32.*1x1 bottleneck.*33 to 64"):
        convert.load_pytorch_vanilla_vae(sd, image_size=32)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda sd: sd.pop("fc_var.bias"), r"missing keys \['fc_var.bias'\]"),
        (lambda sd: sd.update(extra_head=np.zeros(3)), r"unexpected keys \['extra_head'\]"),
        (
            lambda sd: sd.update({"decoder.1.0.weight": np.zeros((256, 128, 3, 4))}),
            r"decoder.1.0.weight: expected \(256, 128, 3, 3\), got \(256, 128, 3, 4\)",
        ),
        (
            lambda sd: sd.update({"final_layer.3.weight": np.zeros((1, 32, 3, 3))}),
            r"final_layer.3.weight: expected \(3, 32, 3, 3\)",
        ),
        (lambda sd: sd.pop("encoder.0.0.weight"), "encoder.0.0.weight"),
        (lambda sd: sd.pop("fc_mu.weight"), "fc_mu.weight"),
    ],
)
def test_bad_state_dicts_raise_naming_the_key(mutate, match):
    sd = {k: np.zeros(s, np.float32) for k, s in SEED_SHAPES.items()}
    mutate(sd)
    with pytest.raises(ValueError, match=match):
        convert.load_pytorch_vanilla_vae(sd)


# ---------------------------------------------------------------------------
# Command line and files
# ---------------------------------------------------------------------------


def test_cli_writes_a_workdir_that_train_py_samples_and_load_trained_reads(
    fixture, converted, tmp_path, capsys, caplog, train_py
):
    """The converter writes a jaxvae workdir: ``train.py --mode sample`` draws its prior samples
    with no dataset anywhere (CelebA is not prepared in the empty data_dir, and offline it
    cannot be), and ``load_trained`` returns exactly the converted variables, which still
    reproduce the PyTorch reconstructions."""
    from PIL import Image

    from jaxvae import config_utils, inference, workdir_files

    sd = torch_state_dict(fixture)
    npz = tmp_path / "vanilla.npz"
    np.savez(npz, **{f"model.{k}": v for k, v in sd.items()})
    out_dir = tmp_path / "out"
    with caplog.at_level("WARNING"):
        convert.main([str(npz), str(out_dir), "--image-size", "16"])
    assert "hidden_dims=(8, 16)" in capsys.readouterr().out
    # orbax's warning about the step-0 checkpoint's missing metrics (on purpose) is not shown.
    assert [r.getMessage() for r in caplog.records if "orbax" in r.pathname] == []
    saved = workdir_files.read_config(out_dir)
    assert saved == config_utils.to_dict(convert.converted_config(converted[0]))
    assert (saved["data"]["name"], saved["data"]["image_size"]) == ("celeb_a", 16)
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["0"]

    data_dir = tmp_path / "tfds"  # holds no CelebA
    code = train_py(
        "--mode", "sample", f"--workdir={out_dir}", f"--config.data.data_dir={data_dir}"
    )
    captured = capsys.readouterr()
    assert code in (0, None), captured.err
    assert "going on without it" in captured.err and "never downloads it" in captured.err
    # Sampling never downloads the dataset (CelebA: GBs): tfds said nothing on stdout.
    assert captured.out.splitlines() == [str(out_dir / "samples" / "samples_step00000000.png")]
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == ["samples_step00000000.png"]
    config = config_utils.from_dict(saved)
    config.data.data_dir = str(data_dir)
    grid = np.asarray(Image.open(out_dir / "samples" / "samples_step00000000.png"))
    n, side = config.eval.num_image_grid, 16
    assert grid.shape[2] == 3 and grid.shape[0] >= n * side and grid.std() > 0

    model, variables, step = inference.load_trained(config, out_dir)
    assert step == 0 and model == converted[0].clone(conv_impl="auto")
    jax.tree.map(np.testing.assert_array_equal, variables, jax.device_get(converted[1]))
    x, eps = jnp.asarray(nhwc(fixture["x"])), jnp.asarray(fixture["eps"])
    out, _, _ = forward(model, variables, x, eps)
    np.testing.assert_allclose(out, nhwc(fixture["eval_recons"]), atol=ATOL, rtol=0)

    # Refusals: a size that does not fit, and a folder that already holds a run; neither
    # writes anything.
    for args, match in [
        ([str(npz), str(tmp_path / "bad")], "16x16 bottleneck"),  # the default 64 does not fit
        ([str(npz), str(out_dir), "--image-size", "16"], "already holds a run"),
    ]:
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        with pytest.raises(SystemExit) as exit_info:
            convert.main(args)
        assert exit_info.value.code == 2
        assert match in capsys.readouterr().err
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("stop", ["no_space", "ctrl_c"])
def test_a_failed_or_interrupted_write_leaves_nothing(converted, tmp_path, monkeypatch, stop):
    """A checkpoint write that fails (here: no space, in the middle of orbax's temporary
    folder) or Ctrl-C there removes what the converter made: the out folder is gone, and the
    same command can be run again. A folder that cannot be made is refused before anything."""
    from jaxvae import checkpointing

    def save(manager, *args, **kwargs):
        (Path(manager.directory) / "0.orbax-checkpoint-tmp").mkdir()
        if stop == "ctrl_c":
            raise KeyboardInterrupt
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:  # as checkpointing.save raises it
            raise checkpointing.write_error(manager, e) from e

    monkeypatch.setattr(checkpointing, "save", save)
    out = tmp_path / "new" / "out"
    error = KeyboardInterrupt if stop == "ctrl_c" else checkpointing.CheckpointWriteError
    with pytest.raises(error) as info:
        convert.save_converted(out, *converted)
    if stop == "no_space":
        assert str(info.value) == (
            f"could not write the converted model in {out}: OSError: [Errno 28] No space left "
            "on device. Nothing was left there; make room or fix the folder's permissions, then "
            "run the same command again."
        )
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"cannot write .*file/out: .*file is not a writable"):
        convert.save_converted(tmp_path / "file" / "out", *converted)


def test_a_file_that_is_not_an_npz_archive_is_named(fixture, tmp_path):
    """Text, or an archive cut short, named .npz: NumPy would read it as a pickle and speak of
    pickled data; the error says what the file should be."""
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    whole = tmp_path / "whole.npz"
    np.savez(whole, a=np.zeros(3))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole.read_bytes()[:-40])
    for path in (text, cut):
        with pytest.raises(ValueError, match=r"not a \.npz archive, or it is cut short.*savez"):
            convert.read_state_dict(path)
    assert list(convert.read_state_dict(whole)) == ["a"]


def test_torch_checkpoint_without_torch_gives_a_clear_error(tmp_path, monkeypatch):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ValueError, match=r"needs torch.*np.savez"):
        convert.read_state_dict(ckpt)


def test_lightning_ckpt_via_torch_when_installed(fixture, tmp_path):
    torch = pytest.importorskip("torch")
    sd = {f"model.{k}": torch.from_numpy(v) for k, v in torch_state_dict(fixture).items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, ckpt)
    read = convert.read_state_dict(ckpt)
    _, variables = convert.load_pytorch_vanilla_vae(read, image_size=16)
    _, want = convert.load_pytorch_vanilla_vae(torch_state_dict(fixture), image_size=16)
    jax.tree.map(np.testing.assert_array_equal, variables, want)
