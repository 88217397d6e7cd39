"""End-to-end training on tfds mock data over 8 CPU devices: outputs, resume, reuse, bad input.

The runs share one module-scoped workdir (a 4-step run) that most tests reuse.
"""

import functools
import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from multiprocess_launcher import mock_data, no_network

from jaxvae import checkpointing, config_utils, inference, optim, run_setup, train_lib, train_state

ROOT = Path(__file__).resolve().parents[1]
NUM_EXAMPLES = 40  # mock split size: eval batches of 16 -> 16, 16, 8 real + 8 masked
CONTRACT_KEYS = {
    "step",
    "test_neg_elbo",
    "test_kl",
    "test_nll_iwae",
    "iwae_samples",
    "test_bits_per_dim",
    "train_images_per_second",
}


def tiny_config(**overrides):
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    for k, v in overrides.items():
        config[k] = v
    return config


@pytest.fixture(scope="module")
def mock():
    with mock_data(num_examples=NUM_EXAMPLES):
        yield


def snapshot(workdir: Path) -> dict[str, str]:
    """Path -> content hash of every file under ``workdir``."""
    return {
        str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
    }


def final_params(workdir: Path, config) -> dict:
    """The parameters of the latest checkpoint, as NumPy."""
    s = run_setup.setup(config, workdir, for_training=False)
    try:
        state, _ = checkpointing.restore(s.manager, s.manager.latest_step(), s.target)
    finally:
        checkpointing.close(s.manager)
    return jax.device_get(
        {
            "params": state.params,
            "batch_stats": state.batch_stats,
            "opt_state": state.opt_state,
            "step": state.step,
        }
    )


@pytest.fixture(scope="module")
def full_run(mock, tmp_path_factory):
    """4 steps in one go (log every 2, checkpoint every 2, eval at 4)."""
    workdir = tmp_path_factory.mktemp("full")
    results = train_lib.train_and_evaluate(tiny_config(), workdir)
    return workdir, results


def test_end_to_end_outputs(full_run):
    workdir, results = full_run
    assert jax.device_count() == 8
    on_disk = json.loads((workdir / "results.json").read_text())
    assert CONTRACT_KEYS <= set(on_disk)
    assert on_disk["step"] == 4 and on_disk["iwae_samples"] == 4
    assert on_disk["num_devices"] == 8
    # Negative ELBO = -reconstruction + KL; the K=4 IWAE bound is tighter on average, and
    # bits/dim is nll / (784 ln 2).
    np.testing.assert_allclose(
        on_disk["test_neg_elbo"], -on_disk["test_reconstruction"] + on_disk["test_kl"], rtol=1e-5
    )
    assert on_disk["test_kl"] > 0 and on_disk["test_nll_iwae"] > 0
    assert on_disk["test_nll_iwae"] < on_disk["test_neg_elbo"] + 5.0
    np.testing.assert_allclose(
        on_disk["test_bits_per_dim"], on_disk["test_nll_iwae"] / (784 * np.log(2)), rtol=1e-5
    )
    assert on_disk["train_images_per_second"] > 0

    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert {"train_loss", "train_kl", "train_images_per_second", "train_learning_rate"} <= set(
        lines[0]
    )
    assert "test_neg_elbo" in lines[1] and "test_neg_elbo" not in lines[0]
    assert lines[1]["train_loss"] < lines[0]["train_loss"]  # it learns (lr 1e-2, 4 steps)

    config = json.loads((workdir / "config.json").read_text())
    assert config["name"] == "tiny" and config["model"]["hidden_dims"] == [8, 16]
    assert list(workdir.glob("events.out.tfevents.*"))
    for name in ("reconstructions", "samples", "interpolation"):
        png = workdir / "images" / f"{name}_step00000004.png"
        assert png.stat().st_size > 100
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]


def test_eval_covers_whole_split_with_masked_padding(full_run, mock):
    workdir, results = full_run
    out = inference.evaluate_workdir(tiny_config(), workdir)
    # 40 examples in batches of 16: the padded 8 of the last batch are not counted.
    assert out["num_examples"] == NUM_EXAMPLES
    assert out["step"] == 4
    # Evaluation is deterministic given the seed: same numbers as at the end of training.
    for k in ("test_neg_elbo", "test_kl", "test_nll_iwae"):
        np.testing.assert_allclose(out[k], results[k], rtol=1e-5)
    assert (workdir / "eval_results.json").exists()
    # Every evaluation is also kept in eval_history.jsonl (a second one adds a line).
    inference.evaluate_workdir(tiny_config(), workdir)
    history = [json.loads(x) for x in (workdir / "eval_history.jsonl").read_text().splitlines()]
    assert len(history) >= 2 and history[-1]["test_nll_iwae"] == out["test_nll_iwae"]
    paths = inference.sample_workdir(tiny_config(), workdir, which="best")
    assert {p.name for p in paths} >= {"samples_step00000004.png"}
    assert all(p.parent == workdir / "samples" and p.stat().st_size > 100 for p in paths)


def test_eval_memory_budget_changes_the_calls_not_the_estimate(full_run, mock):
    """A budget of one sample per decoder call (blocks of 1 example, K chunks of 1) and a
    large one give the same numbers: the plan is a memory setting only."""
    workdir, results = full_run
    tiny = tiny_config()
    tiny.eval.memory_mb = 1e-6
    tiny.eval.iwae_chunk_size = 0
    out = inference.evaluate_workdir(tiny, workdir)
    big = tiny_config()
    big.eval.memory_mb = 4096.0
    big.eval.iwae_chunk_size = 0
    ref = inference.evaluate_workdir(big, workdir)
    for k in ("test_neg_elbo", "test_kl", "test_nll_iwae"):
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, err_msg=k)
        np.testing.assert_allclose(out[k], results[k], rtol=1e-6, err_msg=k)


def test_resume_is_exact(full_run, mock, tmp_path):
    """2 steps, stop, resume to 4 == 4 steps in one run (identical parameters on CPU).

    The first run is given in epochs: 0.8 epochs of the 40 mock examples at batch 16 is
    resolved to 2 steps at run time.
    """
    workdir, _ = full_run
    half = tmp_path / "half"
    first = train_lib.train_and_evaluate(tiny_config(num_train_steps=-1, num_epochs=0.8), half)
    assert first["step"] == 2
    assert (half / "checkpoints" / "2").exists()
    resumed = train_lib.train_and_evaluate(tiny_config(), half)
    assert resumed["step"] == 4
    a = final_params(workdir, tiny_config())
    b = final_params(half, tiny_config())
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # metrics.jsonl holds one history: steps 2 (+ test at 2), 4.
    steps = [json.loads(x)["step"] for x in (half / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_iwae_objective_with_mlp_decoder_resumes_exactly(mock, tmp_path):
    """objective="iwae" (K = 3) on the MLP-decoder model: 2 steps + resume to 4 == 4 steps."""

    def config(**kw):
        c = tiny_config(objective="iwae", iwae_samples=3, **kw)
        c.model.decoder_type, c.model.decoder_hidden_dims = "mlp", (32,)
        return c

    whole, half = tmp_path / "whole", tmp_path / "half"
    full = train_lib.train_and_evaluate(config(), whole)
    assert full["objective"] == "iwae" and full["step"] == 4
    assert train_lib.train_and_evaluate(config(num_train_steps=2), half)["step"] == 2
    assert train_lib.train_and_evaluate(config(), half)["step"] == 4
    a, b = final_params(whole, config()), final_params(half, config())
    assert set(a["params"]["decoder"]) == {"dense_0", "output"}
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_vamp_prior_with_dreg_resumes_exactly(mock, tmp_path):
    """objective="iwae" (K = 3), gradient_estimator="dreg", prior="vamp" (5 pseudo-inputs):
    2 steps + resume to 4 == 4 steps, the pseudo-inputs included (and moved by training);
    the evaluation at step 4 reports the VampPrior model's metrics; a standard-prior config
    is refused on that workdir."""

    def config(**kw):
        c = tiny_config(objective="iwae", iwae_samples=3, gradient_estimator="dreg", **kw)
        c.model.prior, c.model.num_pseudo_inputs = "vamp", 5
        return c

    whole, half = tmp_path / "whole", tmp_path / "half"
    full = train_lib.train_and_evaluate(config(), whole)
    assert full["step"] == 4 and np.isfinite(full["test_nll_iwae"])
    assert full["test_nll_iwae"] < full["test_neg_elbo"] + 5.0
    assert train_lib.train_and_evaluate(config(num_train_steps=2), half)["step"] == 2
    assert train_lib.train_and_evaluate(config(), half)["step"] == 4
    a, b = final_params(whole, config()), final_params(half, config())
    assert a["params"]["pseudo_inputs"].shape == (5, 28, 28, 1)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    model = train_state.build_model(config(), (28, 28, 1))
    init = jax.jit(lambda: train_state.init_train_state(model, optax.identity(), 0))
    start = init().params["pseudo_inputs"]
    assert np.abs(a["params"]["pseudo_inputs"] - start).max() > 1e-3
    with pytest.raises(run_setup.WorkdirMismatchError, match="prior: 'vamp' -> 'standard'"):
        train_lib.train_and_evaluate(tiny_config(), whole)


def test_workdir_with_other_model_is_refused_and_untouched(full_run, mock):
    workdir, _ = full_run
    before = snapshot(workdir)
    other = tiny_config()
    other.model.latent_dim = 5
    with pytest.raises(run_setup.WorkdirMismatchError, match="latent_dim: 4 -> 5"):
        train_lib.train_and_evaluate(other, workdir)
    # Same with a config.json that hides the change: the checkpoint's shapes catch it.
    copy = workdir.parent / "mismatch_copy"
    shutil.copytree(workdir, copy)
    (copy / "config.json").unlink()
    with pytest.raises(checkpointing.CheckpointError, match="different model"):
        train_lib.train_and_evaluate(other, copy)
    assert snapshot(workdir) == before
    assert not (copy / "config.json").exists()


def test_cli_exit_codes_in_process(full_run, mock, capsys, train_py):
    workdir, _ = full_run
    before = snapshot(workdir)
    argv = ["--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir)]
    assert train_py(*argv, "--config.model.latent_dim=5") == 1
    assert "different model" in capsys.readouterr().err
    assert snapshot(workdir) == before


def test_corrupt_checkpoint_gives_actionable_error(full_run, mock, tmp_path):
    workdir, _ = full_run
    copy = tmp_path / "corrupt"
    shutil.copytree(workdir, copy)
    for f in (copy / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(checkpointing.CheckpointError, match=r"rm -r .*checkpoints/4"):
        train_lib.train_and_evaluate(tiny_config(), copy)


def test_the_same_command_on_a_finished_run_changes_nothing(
    full_run, mock, train_py, capsys, tmp_path
):
    """Run again after the last step: no evaluation and no file rewritten (results.json keeps
    its measured throughput); the results are printed as after the training."""
    workdir, results = tmp_path / "again", full_run[1]
    shutil.copytree(full_run[0], workdir)
    before = snapshot(workdir)
    code = train_py("--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir))
    assert code in (0, None)
    out, err = capsys.readouterr()
    assert f"{workdir} is already trained to its last step, 4" in err
    assert "eval step" not in err and json.loads(out)["step"] == 4
    assert json.loads(out)["train_images_per_second"] == results["train_images_per_second"]
    assert snapshot(workdir) == before


def test_unreadable_array_data_is_one_short_error_line(full_run, mock, tmp_path):
    """Array data cut short (a killed copy, a full disk) but metadata intact: the error names
    the folder and the innermost cause in one line, not orbax's wrapped TensorStore spec."""
    copy = tmp_path / "cut"
    shutil.copytree(full_run[0], copy)
    data = [f for f in (copy / "checkpoints" / "4" / "state").rglob("d/*") if f.is_file()]
    assert data
    for f in data:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(checkpointing.CheckpointError) as e:
        inference.load_trained(tiny_config(), copy)
    message = str(e.value)
    assert f"rm -r {copy / 'checkpoints' / '4'}" in message
    assert "\n" not in message and "tensorstore_spec" not in message, message


def _delete_when_checked(monkeypatch, times: int) -> list[int]:
    """Makes the first ``times`` checkpoint checks find their checkpoint deleted, as a run
    training in the workdir deletes its older ones; returns the steps deleted."""
    check, deleted = checkpointing.check_compatible, []

    def deleting(manager, step, target):
        if len(deleted) < times:
            shutil.rmtree(Path(manager.directory) / str(step), ignore_errors=True)
            deleted.append(step)
        return check(manager, step, target)

    monkeypatch.setattr(checkpointing, "check_compatible", deleting)
    return deleted


def test_a_checkpoint_deleted_while_it_is_read_is_replaced_by_the_latest(
    full_run, mock, tmp_path, monkeypatch
):
    """Reading a workdir a run is training in: the checkpoint chosen can vanish under the
    reader (in set-up, or in the restore). The reader reads the list again and takes the
    latest one there then; when they keep vanishing, one error says so (no "rm -r": a folder
    that is gone is not corrupt)."""
    config = tiny_config()
    expected = tmp_path / "expected"  # what is left once 4 is deleted: checkpoint 2
    shutil.copytree(full_run[0], expected)
    shutil.rmtree(expected / "checkpoints" / "4")
    _, want, _ = inference.load_trained(config, expected)

    copy = tmp_path / "live"
    shutil.copytree(full_run[0], copy)
    deleted = _delete_when_checked(monkeypatch, times=2)  # set-up's check, then the restore's
    _, got, step = inference.load_trained(config, copy)
    assert deleted == [4, 4] and step == 2
    jax.tree.map(np.testing.assert_array_equal, got, want)

    many = tmp_path / "many"  # checkpoints 2, 4, 6, 8; three attempts, then the error
    shutil.copytree(full_run[0], many)
    for step in (6, 8):
        shutil.copytree(many / "checkpoints" / "4", many / "checkpoints" / str(step))
    deleted = _delete_when_checked(monkeypatch, times=4)
    with pytest.raises(checkpointing.CheckpointGoneError) as e:
        inference.load_trained(config, many)
    assert deleted == [8, 8, 6, 4]
    assert f"{many / 'checkpoints' / '4'} was deleted while it was being read" in str(e.value)
    assert "rm -r" not in str(e.value)


def test_load_trained_gives_the_checkpoint_and_reproduces_the_reconstructions(full_run, mock):
    """load_trained -> (VAE, variables, step): the latest checkpoint's variables, and a model
    whose reconstructions of the first eval images are the run's reconstructions PNG."""
    from PIL import Image

    from jaxvae import input_pipeline, models, reporting

    workdir, _ = full_run
    before = snapshot(workdir)
    config = tiny_config()
    model, variables, step = inference.load_trained(config, workdir)
    assert step == 4 and isinstance(model, models.VAE)
    assert set(variables) == {"params", "batch_stats"}
    saved = final_params(workdir, config)
    for k in ("params", "batch_stats"):
        assert jax.tree.structure(variables[k]) == jax.tree.structure(saved[k])
        jax.tree.map(np.testing.assert_array_equal, variables[k], saved[k])
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(variables))

    # The grid of run_outputs.save_images: rows of n eval images, each followed by its
    # reconstructions.
    n = config.eval.num_image_grid
    batch = next(input_pipeline.create_eval_batches(config.data, 4 * n, 0, 1))
    x = batch["image"][batch["mask"]]
    assert len(x) == 4 * n
    reconstruct = jax.jit(functools.partial(model.apply, method="reconstruct"))  # one program
    recon = np.asarray(reconstruct(variables, x))
    grid = reporting.image_grid(reporting.interleave_rows(x, recon, n), n)
    png = np.asarray(Image.open(workdir / "images" / "reconstructions_step00000004.png"))
    assert png.shape == grid.shape
    assert np.abs(png.astype(int) - grid.astype(int)).max() <= 1  # uint8 rounding

    assert inference.load_trained(config, workdir, which="best")[2] == 4  # evaluated at 4
    with pytest.raises(ValueError, match="'latest' or 'best'"):
        inference.load_trained(config, workdir, which="first")
    assert snapshot(workdir) == before  # reading a run changes nothing


def test_sampling_needs_no_dataset(full_run, mock, monkeypatch, tmp_path, capsys):
    """A copied workdir on a machine without its dataset (not prepared, no manual_dir, no
    network): sampling draws the run's prior samples anyway, the image shape from
    tensorflow-datasets' description of the dataset (no request made); the grid is the one the
    run drew at that step, and nothing else in the workdir changes."""
    import tensorflow_datasets as tfds

    workdir, _ = full_run
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: False)
    urls = no_network(monkeypatch, "offline")
    config = tiny_config()
    config.data.data_dir = str(tmp_path / "no_data_here")
    before = snapshot(workdir)
    paths = inference.sample_workdir(config, workdir)
    assert [p.name for p in paths] == ["samples_step00000004.png"] and urls == []
    assert "going on without it" in capsys.readouterr().err
    assert paths[0].read_bytes() == (workdir / "images" / paths[0].name).read_bytes()
    after = snapshot(workdir)
    assert {k: v for k, v in after.items() if k != "samples/samples_step00000004.png"} == {
        k: v for k, v in before.items() if k != "samples/samples_step00000004.png"
    }


@pytest.mark.parametrize(("first", "second"), [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_run_resumes_in_the_other_compute_dtype(mock, tmp_path, first, second):
    """``config.model.dtype`` is compute-only (parameters, BatchNorm statistics and optimizer
    state are float32 in either dtype): 2 steps in one dtype, then the same workdir resumed
    with the other one. The checkpoint restores exactly under the other dtype, the run goes
    on from it (steps 3 and 4 equal the other dtype's own step applied twice to the restored
    state and the saved data position), and config.json then records the new dtype."""
    from jaxvae import input_pipeline
    from jaxvae.mesh import shard_batch

    def config(dtype, **kw):
        c = tiny_config(**kw)
        c.model.dtype = dtype
        return c

    workdir = tmp_path / "run"
    assert train_lib.train_and_evaluate(config(first, num_train_steps=2), workdir)["step"] == 2
    saved = final_params(workdir, config(first))
    restored = final_params(workdir, config(second))
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    jax.tree.map(np.testing.assert_array_equal, restored, saved)
    floats = jax.tree.leaves((restored["params"], restored["batch_stats"], restored["opt_state"]))
    assert {a.dtype for a in floats if a.dtype.kind == "f"} == {np.dtype(np.float32)}

    # What resuming must compute: the second dtype's step, twice, from the checkpoint.
    s = run_setup.setup(config(second), workdir, for_training=False)
    try:
        state, data_state = checkpointing.restore(s.manager, 2, s.target)
    finally:
        checkpointing.close(s.manager)
    batches = input_pipeline.create_train_iterator(s.config.data, 16, s.config.seed)
    batches.set_state(data_state)
    for _ in range(2):
        state, _ = s.programs.train_step(state, shard_batch(next(batches)["image"], s.mesh))
    expected = jax.device_get(
        {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
    )

    assert train_lib.train_and_evaluate(config(second), workdir)["step"] == 4
    got = final_params(workdir, config(second))
    assert int(got.pop("step")) == 4
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    # It moved on from the checkpoint (the comparison above has teeth).
    assert not np.array_equal(
        got["params"]["decoder"]["final_conv"]["kernel"],
        saved["params"]["decoder"]["final_conv"]["kernel"],
    )
    assert json.loads((workdir / "config.json").read_text())["model"]["dtype"] == second
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_programs_are_built_once_per_config_and_keep_their_own_copy():
    """build_programs returns the same Programs for an equal config (a second run or
    evaluation in one process reuses the compiled code), also for another run length at a
    constant learning rate (a run of 2 steps resumed to 4); new ones for a different config or
    schedule length, and changing the caller's config afterwards does not reach them."""
    from jaxvae.mesh import make_mesh
    from jaxvae.train_step import make_train_step

    mesh, shape = make_mesh(), (28, 28, 1)
    config = tiny_config()
    first = run_setup.build_programs(config, shape, 4, 2, mesh)
    assert run_setup.build_programs(tiny_config(), shape, 4, 2, mesh) is first
    assert run_setup.build_programs(tiny_config(num_train_steps=2), shape, 2, 2, mesh) is first
    assert run_setup.build_programs(tiny_config(num_epochs=0.5), shape, 7, 2, mesh) is first
    other = tiny_config()
    other.eval.iwae_samples = 8
    assert run_setup.build_programs(other, shape, 4, 2, mesh) is not first
    cosine = tiny_config()
    cosine.optimizer.schedule = "cosine"
    decayed = run_setup.build_programs(cosine, shape, 4, 2, mesh)
    assert decayed is not first
    assert run_setup.build_programs(cosine, shape, 2, 2, mesh) is not decayed

    images = jax.ShapeDtypeStruct((16, *shape), np.float32)

    def traced(step, target) -> str:
        return str(jax.make_jaxpr(step)(target, images))

    # Shared across run lengths, the programs must not read them: steps made for a 2-step
    # and a 3-epoch config trace to the same program.
    tx = optim.create_optimizer(config.optimizer, 4, 2)[0]
    two_steps, three_epochs = (
        make_train_step(first.model, tx, tiny_config(**length), mesh)
        for length in ({"num_train_steps": 2}, {"num_epochs": 3.0})
    )
    assert traced(two_steps, first.target) == traced(three_epochs, first.target)

    # The programs trace lazily (the step reads config.beta when traced); what they trace
    # comes from their own copy of the config.
    def traced_step(programs) -> str:
        return traced(programs.train_step, programs.target)

    config.beta = 2.5
    again = run_setup.build_programs(config, shape, 4, 2, mesh)
    assert again is not first
    assert traced_step(first) == traced_step(
        run_setup.build_programs(tiny_config(), shape, 4, 2, mesh)
    )
    assert traced_step(first) != traced_step(again)
