"""The training program: set up, train with periodic eval/checkpoints, and reuse a workdir.

Entry points (``train.py`` is a thin CLI over them):

- :func:`train_and_evaluate` trains (resuming if the workdir has a checkpoint), evaluates,
  writes ``results.json``.
- :func:`evaluate_workdir` evaluates the latest or best checkpoint of a workdir.
- :func:`sample_workdir` writes prior samples (and reconstructions) of a workdir's checkpoint.

Every check that can reject a run (config, device count, dataset availability, workdir holding
another model) happens in :func:`_setup` *before* anything is written to the workdir.

Workdir: ``config.json`` (resolved config), ``metrics.jsonl``, TensorBoard event files,
``checkpoints/<step>/``, ``images/*.png``, ``results.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxvae import (
    checkpointing,
    config_utils,
    evaluate,
    host_memory,
    input_pipeline,
    optim,
    reporting,
)
from jaxvae import train_state as ts
from jaxvae.train_step import DATA_AXIS, make_mesh, make_train_step, shard_batch

# Offset folded into the seed for evaluation noise: evaluation never consumes training noise,
# so evaluating more or less often does not change the training run.
_EVAL_KEY_SALT = 0x5EED


class WorkdirMismatchError(RuntimeError):
    """The workdir holds a run of a different model; nothing was written."""


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The model and the jitted functions of a config (compiled lazily, on first call)."""

    model: Any  # training model (BatchNorm over "data")
    eval_model: Any  # same parameters, no mapped axis (pictures)
    schedule: Any
    init_fn: Any  # () -> TrainState (not jitted; see init)
    init: Any  # jitted init_fn, output replicated
    train_step: Any
    eval_step: Any
    pictures: Any


# Fields that do not change any compiled function: left out of the cache key.
_NOT_COMPILED = (
    "name",
    "num_train_steps",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
)


def _program_key(config: ml_collections.ConfigDict) -> str:
    d = config_utils.to_dict(config)
    for k in _NOT_COMPILED:
        if k != "num_train_steps" or config.optimizer.schedule in ("constant", "exponential"):
            d.pop(k)
    d["data"] = {k: d["data"][k] for k in ("name", "image_size", "center_crop")}
    return json.dumps(d, sort_keys=True)


@functools.lru_cache(maxsize=4)
def _programs(
    key: str, image_shape: tuple[int, int, int], steps_per_epoch: int, mesh: Mesh
) -> _Programs:
    """Builds (once per process and config) the model, optimizer and jitted step functions.

    Cached so that calling :func:`train_and_evaluate` again in the same process (a notebook, a
    resumed run in a test) reuses the compiled programs instead of compiling them again.
    """
    config = config_utils.from_dict(json.loads(key))
    model = ts.build_model(config, image_shape, DATA_AXIS)
    eval_model = ts.build_model(config, image_shape, None)
    tx, schedule = optim.create_optimizer(config.optimizer, config.num_train_steps, steps_per_epoch)

    def init_fn():
        return ts.init_train_state(model, tx, config.seed)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return _Programs(
        model=model,
        eval_model=eval_model,
        schedule=schedule,
        init_fn=init_fn,
        init=jax.jit(init_fn, out_shardings=replicated),
        train_step=make_train_step(model, tx, config, mesh, config.batch_size),
        eval_step=evaluate.make_eval_step(model, config, mesh),
        pictures=evaluate.make_picture_fn(
            eval_model, config.eval.num_image_grid**2, config.eval.interpolation_steps
        ),
    )


@dataclasses.dataclass
class _Setup:
    config: ml_collections.ConfigDict
    workdir: Path
    mesh: Mesh
    info: Any
    programs: _Programs
    manager: Any
    target: Any  # abstract TrainState


def _setup(config: ml_collections.ConfigDict, workdir: str | Path, for_training: bool) -> _Setup:
    """Validates everything and builds the pieces; writes nothing."""
    workdir = Path(workdir)
    mesh = make_mesh()
    config_utils.validate(config, mesh.size)
    info = input_pipeline.get_dataset_info(config.data)  # raises DatasetNotFoundError

    config_path = workdir / "config.json"
    if config_path.exists():
        old = json.loads(config_path.read_text())
        diff = config_utils.model_config_diff(old, config_utils.to_dict(config))
        if diff and (workdir / "checkpoints").exists():
            raise WorkdirMismatchError(
                f"The workdir {workdir} holds a run of a different model; its config.json "
                f"differs in:\n  " + "\n  ".join(diff) + "\nNothing was changed. Use a fresh "
                "--workdir, or the config that wrote this workdir."
            )

    steps_per_epoch = max(1, info.num_train // config.batch_size)
    programs = _programs(_program_key(config), tuple(info.image_shape), steps_per_epoch, mesh)
    target = ts.abstract_state(programs.init_fn, mesh)
    ckpt_dir = workdir / "checkpoints"
    manager = None
    if ckpt_dir.exists():
        # Read-only: inspecting a workdir must never change it.
        manager = checkpointing.create_manager(ckpt_dir, config.keep_checkpoints, read_only=True)
        latest = manager.latest_step()
        if latest is not None:
            checkpointing.check_compatible(manager, latest, target)
        if for_training:  # training opens its own, writing manager once all checks passed
            manager.close()
            manager = None
    elif not for_training:
        raise checkpointing.CheckpointError(
            f"No checkpoints in {ckpt_dir}: train first "
            f"(python train.py --config <config> --workdir {workdir})."
        )
    return _Setup(config, workdir, mesh, info, programs, manager, target)


def _eval_key(config: ml_collections.ConfigDict) -> jax.Array:
    return jax.random.PRNGKey(config.seed + _EVAL_KEY_SALT)


def _eval_batch_size(s: _Setup) -> int:
    """``config.eval.batch_size`` rounded up to a multiple of the device count (padding masked)."""
    n = s.mesh.size
    return -(-s.config.eval.batch_size // n) * n


def _run_eval(s: _Setup, eval_step, state: ts.TrainState) -> dict[str, float]:
    batches = input_pipeline.create_eval_batches(s.config.data, _eval_batch_size(s))
    num_dims = math.prod(s.info.image_shape)
    return evaluate.evaluate(
        eval_step, state.variables, batches, s.mesh, _eval_key(s.config), num_dims
    )


def _first_eval_images(s: _Setup, count: int) -> np.ndarray:
    """Up to ``count`` real images from the start of the eval split (for the picture grids)."""
    out = []
    for batch in input_pipeline.create_eval_batches(s.config.data, _eval_batch_size(s)):
        out.append(np.asarray(batch["image"])[np.asarray(batch["mask"], bool)])
        if sum(len(o) for o in out) >= count:
            break
    return np.concatenate(out)[:count]


def _save_images(
    s: _Setup,
    state: ts.TrainState,
    step: int,
    writer: reporting.MetricsWriter | None,
    folder: str = "images",
) -> list[Path]:
    """Writes reconstructions, prior samples and interpolations as PNG grids; returns paths."""
    cfg = s.config.eval
    n = cfg.num_image_grid
    pixel_range = "unit" if s.config.model.likelihood == "bernoulli" else s.config.data.pixel_range
    # Pictures run on one device with the replicated variables: no mapped axis needed.
    variables = jax.device_get(state.variables)
    x = _first_eval_images(s, 4 * n)
    key = jax.random.fold_in(_eval_key(s.config), step)
    out = jax.device_get(s.programs.pictures(variables, x, key))
    show = lambda a: reporting.to_display(np.asarray(a), pixel_range)  # noqa: E731
    grids = {
        "reconstructions": (reporting.interleave_rows(show(x), show(out["reconstructions"]), n), n),
        "samples": (show(out["samples"]), n),
    }
    if len(x) >= 2:
        interp = out["interpolation"].reshape(-1, *x.shape[1:])
        grids["interpolation"] = (show(interp), cfg.interpolation_steps)
    paths = []
    for name, (images, ncol) in grids.items():
        grid = reporting.image_grid(images, ncol)
        path = s.workdir / folder / f"{name}_step{step:08d}.png"
        reporting.save_png(path, grid)
        paths.append(path)
        if writer is not None:
            writer.write_image(step, name, grid)
    return paths


def _test_metrics(ev: dict[str, float]) -> dict[str, float]:
    return {
        "test_neg_elbo": ev["neg_elbo"],
        "test_kl": ev["kl"],
        "test_reconstruction": ev["reconstruction"],
        "test_nll_iwae": ev["nll_iwae"],
        "test_bits_per_dim": ev["bits_per_dim"],
        "test_bits_per_dim_elbo": ev["bits_per_dim_elbo"],
    }


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, progress_stream=None
) -> dict[str, Any]:
    """Trains ``config.num_train_steps`` steps in ``workdir`` (resuming), returns ``results.json``.

    Raises (before writing anything): ``config_utils.ConfigError``,
    ``input_pipeline.DatasetNotFoundError``, :class:`WorkdirMismatchError`,
    ``checkpointing.CheckpointError``.
    """
    s = _setup(config, workdir, for_training=True)
    cfg = s.config
    workdir = s.workdir
    manager = checkpointing.create_manager(workdir / "checkpoints", cfg.keep_checkpoints)
    start_step = 0
    data_state = None
    latest = manager.latest_step()
    if latest is not None:
        try:
            state, data_state = checkpointing.restore(manager, latest, s.target)
        except checkpointing.CheckpointError:
            manager.close()
            raise
        start_step = int(jax.device_get(state.step))
    else:
        state = s.programs.init()

    # From here on the workdir is ours: write the resolved config.
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        reporting.write_json(workdir / "config.json", config_utils.to_dict(cfg))

    train_iter = input_pipeline.create_train_iterator(cfg.data, cfg.batch_size, cfg.seed)
    if data_state is not None:
        train_iter.set_state(data_state)
    train_step, eval_step = s.programs.train_step, s.programs.eval_step
    # Files are written by process 0 only (every process holds the same replicated values).
    is_main = jax.process_index() == 0
    writer = reporting.MetricsWriter(workdir, start_step) if is_main else None
    progress = reporting.Progress(cfg.num_train_steps, start_step, cfg.batch_size, progress_stream)
    timer = reporting.Timer()
    if start_step:
        progress.message(f"Resumed from {workdir / 'checkpoints'} at step {start_step}.")
    progress.message(
        f"Training {cfg.name} on {s.mesh.size} device(s) ({jax.devices()[0].platform}), "
        f"global batch {cfg.batch_size}, {cfg.num_train_steps} steps, workdir {workdir}"
        f"{'; huge-page malloc' if host_memory.hugepages_active() else ''}."
    )

    last_eval: dict[str, float] | None = None
    pending: list[dict[str, jax.Array]] = []
    window_start = start_step
    try:
        for step in range(start_step, cfg.num_train_steps):
            batch = next(train_iter)
            state, metrics = train_step(state, shard_batch(batch["image"], s.mesh))
            pending.append(metrics)
            done = step + 1
            progress.update(done)
            is_last = done == cfg.num_train_steps
            record: dict[str, float] = {}  # one metrics.jsonl line per logged step
            if done % cfg.log_every_steps == 0 or is_last:
                host = jax.device_get(pending)  # the only sync with the devices per window
                rate = timer.mark((done - window_start) * cfg.batch_size)
                means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                means["learning_rate"] = float(s.programs.schedule(done - 1))
                means["images_per_second"] = rate
                record.update({f"train_{k}": v for k, v in means.items()})
                progress.log(done, means, rate)
                pending, window_start = [], done
            do_eval = done % cfg.eval_every_steps == 0 or is_last
            do_ckpt = done % cfg.checkpoint_every_steps == 0 or is_last
            if do_eval or do_ckpt:
                jax.block_until_ready(state)  # finish the queued steps inside the window
                t0 = time.perf_counter()
            if do_eval:
                ev = _run_eval(s, eval_step, state)
                last_eval = _test_metrics(ev)
                record.update(last_eval)
                if is_main:
                    _save_images(s, state, done, writer)
                progress.message(
                    f"eval step {done}: neg_elbo {ev['neg_elbo']:.3f}  kl {ev['kl']:.3f}  "
                    f"nll_iwae(K={cfg.eval.iwae_samples}) {ev['nll_iwae']:.3f}  "
                    f"bits/dim {ev['bits_per_dim']:.4f}"
                )
            if record and writer is not None:
                writer.write(done, record)
            if do_eval or do_ckpt:
                checkpointing.save(
                    manager, done, state, train_iter.get_state(), last_eval if do_eval else None
                )
                timer.exclude(time.perf_counter() - t0)
    finally:
        progress.close()
        checkpointing.close(manager)  # waits for asynchronous saves
        if writer is not None:
            writer.close()

    final_step = int(jax.device_get(state.step))
    if last_eval is None:  # nothing left to train: evaluate what was restored
        last_eval = _test_metrics(_run_eval(s, eval_step, state))
    results = {
        "step": final_step,
        **last_eval,
        "iwae_samples": cfg.eval.iwae_samples,
        "train_images_per_second": timer.images_per_second,
        "num_devices": s.mesh.size,
        "global_batch_size": cfg.batch_size,
        "config": cfg.name,
        "objective": cfg.objective,
    }
    if is_main:
        reporting.write_json(workdir / "results.json", _finite(results))
    return results


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf -> None so results.json is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _restore_for_inference(
    config: ml_collections.ConfigDict, workdir: str | Path, which: str
) -> tuple[_Setup, ts.TrainState, int]:
    if which not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest' or 'best', got {which!r}")
    s = _setup(config, workdir, for_training=False)
    step = s.manager.latest_step() if which == "latest" else s.manager.best_step()
    if step is None:
        raise checkpointing.CheckpointError(
            f"No checkpoint in {s.workdir / 'checkpoints'}: train first."
        )
    state, _ = checkpointing.restore(s.manager, step, s.target)
    return s, state, step


def evaluate_workdir(
    config: ml_collections.ConfigDict, workdir: str | Path, which: str = "latest"
) -> dict[str, Any]:
    """Evaluates a workdir's ``latest``/``best`` checkpoint; writes ``eval_results.json``."""
    s, state, step = _restore_for_inference(config, workdir, which)
    try:
        eval_step = s.programs.eval_step
        t0 = time.perf_counter()
        ev = _run_eval(s, eval_step, state)
        results = {
            "step": step,
            "checkpoint": which,
            **_test_metrics(ev),
            "iwae_samples": s.config.eval.iwae_samples,
            "num_examples": ev["num_examples"],
            "eval_seconds": time.perf_counter() - t0,
        }
        reporting.write_json(s.workdir / "eval_results.json", _finite(results))
    finally:
        checkpointing.close(s.manager)
    return results


def sample_workdir(
    config: ml_collections.ConfigDict, workdir: str | Path, which: str = "latest"
) -> list[Path]:
    """Writes the PNG grids of a checkpoint to ``<workdir>/samples/``; returns their paths."""
    s, state, step = _restore_for_inference(config, workdir, which)
    try:
        # A folder of its own: never overwrite the pictures written during training.
        paths = _save_images(s, state, step, None, folder="samples")
    finally:
        checkpointing.close(s.manager)
    return paths


__all__ = [
    "WorkdirMismatchError",
    "evaluate_workdir",
    "sample_workdir",
    "train_and_evaluate",
]
