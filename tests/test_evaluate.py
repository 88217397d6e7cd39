"""The IWAE evaluation's memory plan and progress reports (the estimates: tests/test_train.py)."""

from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jaxvae import config_utils, evaluate, models
from jaxvae import train_state as ts
from jaxvae.mesh import make_mesh

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "local_batch, k, per_sample, memory_mb, cap, expected",
    [
        (500, 5000, MiB, 512, 0, (1, None)),  # 512 samples per call: all 500 rows, 1 sample
        (500, 5000, MiB // 4, 512, 0, (4, None)),  # 2048 per call: 4 samples of 500 rows
        (500, 5000, MiB // 4, 512, 3, (3, None)),  # the user's cap
        (500, 3, MiB // 4, 512, 0, (3, None)),  # never more than K
        (500, 5000, 4 * MiB, 512, 0, (1, 128)),  # not even one sample of all rows: blocks
        (500, 5000, 4 * MiB, 1e-9, 0, (1, 1)),  # the smallest call: one sample
    ],
)
def test_iwae_plan(local_batch, k, per_sample, memory_mb, cap, expected):
    chunk, rows = evaluate.iwae_plan(local_batch, k, per_sample, memory_mb, cap)
    assert (chunk, rows) == expected
    assert chunk * (rows or local_batch) * per_sample <= max(memory_mb * MiB, per_sample)


def test_decoder_bytes_per_sample_scales_with_the_decoder():
    """XLA's figure for the compiled decoder: a wider decoder costs more per sample, and a
    decoder call of n samples needs n times that (plus a constant) by the same measure."""
    config = config_utils.base_config()
    ll = models.make_log_likelihood_fn("bernoulli")
    sizes = {}
    for name, kind, dims in [("mlp256", "mlp", (256,)), ("mlp1024", "mlp", (1024, 1024))]:
        config.model.decoder_type, config.model.decoder_hidden_dims = kind, dims
        model = ts.build_model(config, (28, 28, 1))
        sizes[name] = evaluate.decoder_bytes_per_sample(
            model, evaluate.abstract_variables(model), ll
        )
    assert sizes["mlp256"] >= 4 * 256  # at least one hidden activation per sample
    assert sizes["mlp1024"] >= 4 * 1024
    assert sizes["mlp1024"] > sizes["mlp256"]


def test_the_plan_keeps_the_compiled_eval_step_within_its_budget():
    """The whole compiled evaluation step (ELBO + IWAE, K = 1000, on 1 and 8 devices), as XLA
    reports it: its temporary memory beyond the same step with K = 1 stays within
    ``eval.memory_mb`` per device, and a larger budget is used (the plan is not timid)."""
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    config.eval.iwae_samples = 1000
    model = ts.build_model(config, (28, 28, 1))
    variables = evaluate.abstract_variables(model)
    images = jax.ShapeDtypeStruct((64, 28, 28, 1), np.float32)
    mask = jax.ShapeDtypeStruct((64,), bool)

    def temp_mib(mesh, memory_mb, k):
        config.eval.memory_mb, config.eval.iwae_samples = memory_mb, k
        step = evaluate.make_eval_step(model, config, mesh)
        args = (variables, images, mask, jax.random.key(0), np.int32(0))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes / MiB

    for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh(devices)
        base = temp_mib(mesh, 1.0, 1)
        used = {mb: temp_mib(mesh, mb, 1000) - base for mb in (1.0, 4.0)}
        print(f"{len(devices)} device(s): beyond K=1 {used} MiB")
        assert all(v <= mb for mb, v in used.items()), used
        assert used[4.0] > used[1.0]


def test_evaluate_reports_progress_after_every_batch():
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    mesh = make_mesh()
    model = ts.build_model(config, (28, 28, 1))
    variables = jax.jit(lambda: ts.init_train_state(model, optax.sgd(0.1), 0))()
    step = evaluate.make_eval_step(model, config, mesh)
    rng = np.random.default_rng(0)
    batches = [
        {"image": (rng.random((16, 28, 28, 1)) < 0.3).astype(np.float32), "mask": m}
        for m in (np.ones(16, bool), np.arange(16) < 5)
    ]
    calls = []
    out = evaluate.evaluate(
        step,
        variables.variables,
        batches,
        mesh,
        jax.random.key(0),
        784,
        progress=lambda n, s: calls.append((n, s)),
    )
    assert [n for n, _ in calls] == [16, 21] and out["num_examples"] == 21
    assert calls[0][1] <= calls[1][1]


def test_metrics_do_not_depend_on_devices_batch_size_or_memory_plan():
    """One checkpoint, 21 examples, evaluated on 1 device in batches of 7, on 8 devices in
    batches of 16 and of 24 (padding masked), with a roomy and a tight memory plan: the same
    test metrics (each example draws its noise from its index in the split). Another key
    gives other metrics, so the comparison has teeth."""
    config = config_utils.load_config_file(ROOT / "configs" / "tiny.py")
    config.eval.iwae_samples = 20
    model = ts.build_model(config, (28, 28, 1))
    variables = jax.jit(lambda: ts.init_train_state(model, optax.sgd(0.1), 0))().variables
    images = (np.random.default_rng(3).random((21, 28, 28, 1)) < 0.3).astype(np.float32)

    def batches(size):
        for start in range(0, len(images), size):
            rows = images[start : start + size]
            out = np.zeros((size, *images.shape[1:]), np.float32)
            out[: len(rows)] = rows
            yield {"image": out, "mask": np.arange(size) < len(rows)}

    def run(devices, size, memory_mb, key=0):
        config.eval.memory_mb = memory_mb
        mesh = make_mesh(devices)
        step = evaluate.make_eval_step(model, config, mesh)
        return evaluate.evaluate(step, variables, batches(size), mesh, jax.random.key(key), 784)

    one, eight = jax.devices()[:1], jax.devices()
    want = run(one, 7, 512.0)
    for got in (run(eight, 16, 512.0), run(eight, 24, 512.0), run(one, 7, 0.01)):
        assert got["num_examples"] == 21
        for k in ("neg_elbo", "reconstruction", "kl", "nll_iwae"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
    other = run(one, 7, 512.0, key=1)
    assert abs(other["nll_iwae"] - want["nll_iwae"]) > 1e-3
