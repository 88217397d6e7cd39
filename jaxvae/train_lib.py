"""The training program: set up, train with periodic eval/checkpoints, and reuse a workdir.

Entry points (``train.py`` is a thin CLI over them):

- :func:`train_and_evaluate` trains (resuming if the workdir has a checkpoint), evaluates,
  writes ``results.json``.
- :func:`evaluate_workdir` evaluates the latest or best checkpoint of a workdir.
- :func:`sample_workdir` writes prior samples (and reconstructions) of a workdir's checkpoint.
- :func:`load_trained` returns a workdir's trained model and variables, for your own code.

Every check that can reject a run (config, device count, dataset availability, workdir holding
another model) happens in :func:`_setup` *before* anything is written to the workdir.

Workdir: ``config.json`` (resolved config), ``metrics.jsonl``, TensorBoard event files,
``checkpoints/<step>/``, ``images/*.png``, ``results.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxvae import (
    checkpointing,
    compilation_cache,
    config_utils,
    distributed,
    evaluate,
    host_memory,
    input_pipeline,
    optim,
    paths,
    preemption,
    reporting,
    workdir_files,
    workdir_lock,
)
from jaxvae import train_state as ts
from jaxvae.mesh import make_mesh, replicated_sharding, shard_batch
from jaxvae.train_step import make_train_step

# Offset folded into the seed for evaluation noise: evaluation never consumes training noise,
# so evaluating more or less often does not change the training run.
_EVAL_KEY_SALT = 0x5EED


class WorkdirMismatchError(RuntimeError):
    """The workdir holds a run of a different model; nothing was written."""


# config.model fields that change how the model computes, not what it is: the parameters and
# BatchNorm statistics are float32 in either compute dtype, so a run started in float32 (say on
# a CPU) may resume or be evaluated in bfloat16 (on a TPU), and back.
_COMPUTE_ONLY_MODEL_FIELDS = ("dtype",)


def _without_compute_only(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a ``config.json`` dict) without :data:`_COMPUTE_ONLY_MODEL_FIELDS`."""
    model = {k: v for k, v in config["model"].items() if k not in _COMPUTE_ONLY_MODEL_FIELDS}
    return {**config, "model": model}


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The model and the jitted functions of a config (compiled lazily, on first call)."""

    model: Any
    schedule: Any
    init_fn: Any  # () -> TrainState (not jitted; see init)
    init: Any  # jitted init_fn, output replicated
    train_step: Any
    eval_step: Any
    pictures: Any


def _build_programs(
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, int, int],
    num_train_steps: int,
    steps_per_epoch: int,
    mesh: Mesh,
) -> _Programs:
    """The model, optimizer and jitted step functions of ``config`` (compiled on first call)."""
    model = ts.build_model(config, image_shape)
    tx, schedule = optim.create_optimizer(config.optimizer, num_train_steps, steps_per_epoch)

    def init_fn():
        return ts.init_train_state(model, tx, config.seed)

    return _Programs(
        model=model,
        schedule=schedule,
        init_fn=init_fn,
        init=jax.jit(init_fn, out_shardings=replicated_sharding(mesh)),
        train_step=make_train_step(model, tx, config, mesh),
        eval_step=evaluate.make_eval_step(model, config, mesh),
        pictures=evaluate.make_picture_fn(
            model, config.eval.num_image_grid**2, config.eval.interpolation_steps
        ),
    )


@dataclasses.dataclass
class _Setup:
    config: ml_collections.ConfigDict
    workdir: Path
    mesh: Mesh
    info: Any
    num_train_steps: int  # resolved from config.num_train_steps or config.num_epochs
    programs: _Programs
    manager: Any
    target: Any  # abstract TrainState


def _setup(config: ml_collections.ConfigDict, workdir: str | Path, for_training: bool) -> _Setup:
    """Validates everything and builds the pieces; writes nothing (in the workdir)."""
    compilation_cache.enable()  # before anything compiles: a second start loads its programs
    workdir = Path(workdir)
    mesh = make_mesh()
    config_utils.validate(config, mesh.size)
    info = input_pipeline.get_dataset_info(config.data)  # raises DatasetNotFoundError

    ckpt_dir = workdir / "checkpoints"
    old = workdir_files.read_config(workdir)  # raises DamagedFileError
    if for_training:
        _check_metrics_history(workdir, ckpt_dir)
    if old is not None and ckpt_dir.exists():
        new = config_utils.to_dict(config)
        diff = config_utils.model_config_diff(
            _without_compute_only(old), _without_compute_only(new)
        )
        if diff:
            raise WorkdirMismatchError(
                f"The workdir {workdir} holds a run of a different model; its config.json "
                f"differs in:\n  " + "\n  ".join(diff) + "\nNothing was changed. Use a fresh "
                "--workdir, or the config that wrote this workdir."
            )
        diff = config_utils.resume_config_diff(old, new) if for_training else []
        if diff:
            raise WorkdirMismatchError(
                f"The workdir {workdir} holds a run that cannot be resumed with these settings "
                f"(they fix the data order and position saved in its checkpoints):\n  "
                + "\n  ".join(diff)
                + "\nNothing was changed. Resume with the values in its config.json, or use a "
                "fresh --workdir."
            )

    steps_per_epoch = max(1, info.num_train // config.batch_size)
    num_train_steps = config_utils.resolve_train_steps(config, info.num_train)
    programs = _build_programs(
        config, tuple(info.image_shape), num_train_steps, steps_per_epoch, mesh
    )
    target = ts.abstract_state(programs.init_fn, mesh)
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
        if (workdir / workdir_files.METRICS).exists():
            raise checkpointing.CheckpointError(
                f"{ckpt_dir} is missing, though {workdir} holds a trained run (its "
                f"{workdir_files.METRICS}): the checkpoints were moved or deleted; put them back."
            )
        raise checkpointing.CheckpointError(
            f"No checkpoints in {ckpt_dir}: train first "
            f"(python train.py --config <config> --workdir {workdir})."
        )
    distributed.sync_processes("jaxvae:setup")  # all inspected the workdir; none wrote yet
    return _Setup(config, workdir, mesh, info, num_train_steps, programs, manager, target)


def _check_metrics_history(workdir: Path, ckpt_dir: Path) -> None:
    """Refuses to train on a damaged ``metrics.jsonl``, or on one that records training whose
    ``checkpoints/`` is gone: the run would start over and drop that record.

    (A ``checkpoints/`` folder with no step in it is a run stopped before its first save; it
    starts over as it should.)
    """
    path = workdir / workdir_files.METRICS
    steps = [r["step"] for r in workdir_files.read_jsonl(path) if isinstance(r.get("step"), int)]
    if steps and not ckpt_dir.exists():
        raise checkpointing.CheckpointError(
            f"{ckpt_dir} is missing, but {path} records training up to step {max(steps)}: the "
            "checkpoints were moved or deleted, and training now would start over and drop "
            "that record. Nothing was changed; put the checkpoints back, use a fresh --workdir, "
            f"or move {path.name} away to start over in this one."
        )


def _check_writable(workdir: Path) -> None:
    """Refuses a workdir that is a file, or that cannot be written, before anything happens."""
    reason = paths.not_writable_reason(workdir)
    if reason is not None:
        raise config_utils.ConfigError(
            f"--workdir {workdir} cannot be written ({reason}); choose a folder you can write to."
        )


def _eval_key(config: ml_collections.ConfigDict) -> jax.Array:
    return jax.random.PRNGKey(config.seed + _EVAL_KEY_SALT)


def _eval_batch_size(s: _Setup) -> int:
    """``config.eval.batch_size`` rounded up to a multiple of the device count (padding masked)."""
    n = s.mesh.size
    return -(-s.config.eval.batch_size // n) * n


def _eval_progress(s: _Setup) -> Callable[[int, float], None]:
    """Prints the progress of an evaluation that runs for more than 30 s, every 30 s."""
    total, k = s.info.num_eval, s.config.eval.iwae_samples
    last = [0.0]

    def report(done: int, seconds: float) -> None:
        if jax.process_index() != 0 or seconds < last[0] + 30.0 or done <= 0:
            return
        last[0] = seconds
        eta = (total - done) * seconds / done
        print(
            f"eval: {done:,}/{total:,} examples ({100 * done / total:.0f}%), K={k}: "
            f"{datetime.timedelta(seconds=int(seconds))} elapsed, "
            f"ETA {datetime.timedelta(seconds=int(eta))}, "
            f"{done * k / seconds:,.0f} posterior samples/s",
            file=sys.stderr,
            flush=True,
        )

    return report


def _run_eval(s: _Setup, eval_step, state: ts.TrainState) -> dict[str, float]:
    batches = input_pipeline.create_eval_batches(s.config.data, _eval_batch_size(s))
    num_dims = math.prod(s.info.image_shape)
    return evaluate.evaluate(
        eval_step,
        state.variables,
        batches,
        s.mesh,
        _eval_key(s.config),
        num_dims,
        progress=_eval_progress(s),
    )


def _first_eval_images(s: _Setup, count: int) -> np.ndarray:
    """Up to ``count`` real images from the start of the eval split (for the picture grids).

    Read as by a single process (all rows), so the pictures do not depend on the process count.
    """
    out = []
    for batch in input_pipeline.create_eval_batches(s.config.data, _eval_batch_size(s), 0, 1):
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
    # Pictures run on one device with the replicated variables.
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
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    progress_stream=None,
    *,
    progress_bar: bool | None = None,
) -> dict[str, Any]:
    """Trains ``workdir``'s run to its last step (resuming), evaluates, returns ``results.json``.

    The length of the run is ``config.num_train_steps``, or ``config.num_epochs`` of the
    training split at ``config.batch_size`` when ``num_train_steps`` is -1
    (:func:`jaxvae.config_utils.resolve_train_steps`).

    Progress goes to ``progress_stream`` (default stderr): a tqdm bar when that stream is a
    terminal, plain log lines otherwise. ``progress_bar=True`` asks for the bar whatever the
    stream (``tqdm.auto``: a widget in Jupyter/Colab), ``False`` for the log lines.

    A workdir is trained by one run at a time: the run holds ``<workdir>/jaxvae.lock``
    (:mod:`jaxvae.workdir_lock`; process 0 of several) and removes it when it ends.

    Raises (before writing anything): ``config_utils.ConfigError``,
    ``input_pipeline.DatasetNotFoundError``, :class:`WorkdirMismatchError`,
    ``checkpointing.CheckpointError``, ``workdir_lock.WorkdirBusyError``,
    ``workdir_files.DamagedFileError``.
    """
    workdir = Path(workdir)
    _check_writable(workdir)
    with _workdir_lock(workdir) as release:
        s = _setup(config, workdir, for_training=True)
        return _train(s, progress_stream, progress_bar, release)


@contextlib.contextmanager
def _workdir_lock(workdir: Path) -> Iterator[Callable[[], None]]:
    """Process 0 holds the workdir's lock for the run; every process learns whether it got it.

    Yields the lock's release (nothing to do on other processes), for an exit that skips the
    ``with`` (a second Ctrl-C).
    """
    lock, refusal = None, ""
    if jax.process_index() == 0:
        try:
            lock = workdir_lock.acquire(workdir)
        except workdir_lock.WorkdirBusyError as e:
            refusal = str(e)
        except OSError as e:  # said on every process, which would otherwise wait for this one
            refusal = f"--workdir {workdir}: its lock could not be taken ({type(e).__name__}: {e})."
    refusal = distributed.allgather_texts(refusal)[0]  # process 0's outcome, on every process
    if refusal:
        raise workdir_lock.WorkdirBusyError(refusal)
    try:
        yield lock.release if lock else (lambda: None)
    finally:
        if lock:
            lock.release()


def _train(
    s: _Setup, progress_stream, progress_bar: bool | None, release_lock: Callable[[], None]
) -> dict[str, Any]:
    """The body of :func:`train_and_evaluate`, once the workdir is held and checked."""
    cfg = s.config
    workdir = s.workdir
    num_steps = s.num_train_steps
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
    progress = reporting.Progress(
        num_steps, start_step, cfg.batch_size, progress_stream, use_bar=progress_bar
    )
    timer = reporting.Timer()
    if start_step:
        progress.message(f"Resumed from {workdir / 'checkpoints'} at step {start_step}.")
    progress.message(
        f"Training {cfg.name} on {s.mesh.size} device(s) ({jax.devices()[0].platform})"
        f"{f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''}, "
        f"global batch {cfg.batch_size}, {num_steps} steps "
        f"({num_steps * cfg.batch_size / s.info.num_train:.4g} epochs), workdir {workdir}"
        f"{'; huge-page malloc' if host_memory.hugepages_active() else ''}."
    )

    last_eval: dict[str, float] | None = None
    results: dict[str, Any] | None = None
    pending: list[dict[str, jax.Array]] = []
    window_start = start_step
    saved_step = latest  # the newest checkpoint known to hold finite values
    stop = preemption.StopSignal(on_abort=release_lock)
    # Signals are handled until every save has been written (a second Ctrl-C aborts at once).
    with stop:
        try:
            for step in range(start_step, num_steps):
                batch = next(train_iter)
                state, metrics = train_step(state, shard_batch(batch["image"], s.mesh))
                pending.append(metrics)
                done = step + 1
                progress.update(done)
                is_last = done == num_steps
                stopping = stop.reached(done)  # every process stops at the same step
                do_log = done % cfg.log_every_steps == 0 or is_last or stopping
                do_eval = done % cfg.eval_every_steps == 0 or is_last
                do_ckpt = done % cfg.checkpoint_every_steps == 0 or is_last or stopping
                if not (do_log or do_eval or do_ckpt):
                    continue
                # The only sync with the devices per window; nothing non-finite goes further.
                host = jax.device_get(pending)
                _check_finite(host, window_start, s, saved_step)
                record: dict[str, float] = {}  # one metrics.jsonl line per logged step
                if do_log:
                    rate = timer.mark((done - window_start) * cfg.batch_size)
                    means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                    means["learning_rate"] = float(s.programs.schedule(done - 1))
                    means["images_per_second"] = rate
                    record.update({f"train_{k}": v for k, v in means.items()})
                    progress.log(done, means, rate)
                    pending, window_start = [], done
                jax.block_until_ready(state)  # finish the queued steps inside the window
                t0 = time.perf_counter()
                if do_eval:
                    ev = _run_eval(s, eval_step, state)
                    _check_finite([ev], done - 1, s, saved_step, prefix="test_")
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
                if is_last:
                    # Before the last save, so a checkpoint that cannot be written loses no
                    # result.
                    results = _results(s, done, last_eval, timer)
                    if is_main:
                        reporting.write_json(workdir / "results.json", _finite(results))
                if do_eval or do_ckpt:
                    checkpointing.save(
                        manager, done, state, train_iter.get_state(), last_eval if do_eval else None
                    )
                    saved_step = done
                timer.exclude(time.perf_counter() - t0)
                if stopping and not is_last:
                    break
        finally:
            progress.close()
            if writer is not None:
                writer.close()
            checkpointing.close(manager)  # waits for asynchronous saves; raises if one failed

    final_step = int(jax.device_get(state.step))
    if stop.requested and final_step < num_steps:
        raise preemption.Preempted(
            f"Stopped by {stop.signal_name} at step {final_step} of {num_steps}: checkpoint "
            f"saved in {workdir / 'checkpoints' / str(final_step)}. Run the same command "
            "again to resume from there.",
            stop.exit_code,
        )
    if results is None:  # nothing left to train: evaluate what was restored
        last_eval = _test_metrics(_run_eval(s, eval_step, state))
        results = _results(s, final_step, last_eval, timer)
        if is_main:
            reporting.write_json(workdir / "results.json", _finite(results))
    return results


class TrainingDivergedError(RuntimeError):
    """A loss, gradient or test metric became NaN/inf; nothing from that step on was saved."""


def _check_finite(
    window: list[dict[str, Any]],
    first_step: int,
    s: _Setup,
    saved_step: int | None,
    prefix: str = "train_",
) -> None:
    """Raises :class:`TrainingDivergedError` at the first step whose metrics are not finite.

    ``window[i]`` holds the metrics of step ``first_step + i + 1``.
    """
    for i, metrics in enumerate(window):
        bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
        if not bad:
            continue
        cfg = s.config
        where = (
            f"The last good checkpoint is step {saved_step} in {s.workdir / 'checkpoints'}; "
            "rerunning resumes from it."
            if saved_step is not None
            else "No checkpoint had been saved yet."
        )
        raise TrainingDivergedError(
            f"Training diverged: {', '.join(prefix + k for k in bad)} became NaN or infinite at "
            f"step {first_step + i + 1}. Nothing from that step on was saved. {where} To avoid "
            f"it, lower the learning rate (--config.optimizer.learning_rate="
            f"{cfg.optimizer.learning_rate / 10:g}), clip gradients "
            "(--config.optimizer.grad_clip_norm=1.0) or warm up the KL term "
            "(--config.kl_warmup_steps=1000)."
        )


def _results(
    s: _Setup, step: int, last_eval: dict[str, float] | None, timer: reporting.Timer
) -> dict[str, Any]:
    """The contents of ``results.json``."""
    cfg = s.config
    return {
        "step": step,
        **(last_eval or {}),
        "iwae_samples": cfg.eval.iwae_samples,
        "train_images_per_second": timer.images_per_second,
        "num_devices": s.mesh.size,
        "num_processes": jax.process_count(),
        "global_batch_size": cfg.batch_size,
        "config": cfg.name,
        "objective": cfg.objective,
    }


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
        latest = s.manager.latest_step()
        checkpointing.close(s.manager)
        if which == "best" and latest is not None:
            raise checkpointing.CheckpointError(
                f"No checkpoint in {s.workdir / 'checkpoints'} has been evaluated yet, so there "
                f"is no best one; use --checkpoint latest (step {latest})."
            )
        raise checkpointing.CheckpointError(
            f"No checkpoint in {s.workdir / 'checkpoints'}: train first."
        )
    state, _ = checkpointing.restore(s.manager, step, s.target)
    return s, state, step


def evaluate_workdir(
    config: ml_collections.ConfigDict, workdir: str | Path, which: str = "latest"
) -> dict[str, Any]:
    """Evaluates a workdir's ``latest``/``best`` checkpoint; writes ``eval_results.json``.

    ``eval_results.json`` holds the latest evaluation; each one is also appended as a line to
    ``eval_history.jsonl``, so a quick re-evaluation never loses a long (K = 5000) one.
    """
    history = Path(workdir) / workdir_files.EVAL_HISTORY
    workdir_files.read_jsonl(history)  # a damaged history is refused, never appended to
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
            "eval_split": s.config.data.eval_split,
            "eval_seconds": time.perf_counter() - t0,
        }
        if jax.process_index() == 0:  # every process computed the same (replicated) sums
            reporting.write_json(s.workdir / "eval_results.json", _finite(results))
            with history.open("a") as f:
                f.write(json.dumps(_finite(results), sort_keys=True) + "\n")
    finally:
        checkpointing.close(s.manager)
    return results


def load_trained(
    config: ml_collections.ConfigDict, workdir: str | Path, which: str = "latest"
) -> tuple[Any, dict[str, Any], int]:
    """The trained model of a workdir, to use in your own code: ``(model, variables, step)``.

    ``model`` is the run's :class:`jaxvae.models.VAE` (a Flax module), ``variables`` the
    ``{"params", "batch_stats"}`` of the workdir's ``latest`` or
    ``best`` checkpoint as NumPy arrays on the host, and ``step`` that checkpoint's step. The
    config must describe the workdir's model (its ``config.json``; another model is refused with
    :class:`WorkdirMismatchError`). Nothing in the workdir is changed. For example::

        model, variables, step = load_trained(config, "runs/mnist")
        images = model.apply(variables, x, method="reconstruct")  # x: [N, H, W, C]
        samples = model.apply(variables, jax.random.key(0), 16, method="sample")

    Raises ``checkpointing.CheckpointError`` when the workdir has no (evaluated, for ``best``)
    checkpoint, ``ValueError`` for another ``which``.
    """
    s, state, step = _restore_for_inference(config, workdir, which)
    try:
        variables = jax.device_get(state.variables)
    finally:
        checkpointing.close(s.manager)
    return s.programs.model, variables, int(step)


def sample_workdir(
    config: ml_collections.ConfigDict, workdir: str | Path, which: str = "latest"
) -> list[Path]:
    """Writes the PNG grids of a checkpoint to ``<workdir>/samples/``; returns their paths."""
    s, state, step = _restore_for_inference(config, workdir, which)
    try:
        # A folder of its own: never overwrite the pictures written during training.
        # Process 0 alone draws them (on one of its devices, from the replicated variables).
        is_main = jax.process_index() == 0
        paths = _save_images(s, state, step, None, folder="samples") if is_main else []
    finally:
        checkpointing.close(s.manager)
    return paths


__all__ = [
    "TrainingDivergedError",
    "WorkdirMismatchError",
    "evaluate_workdir",
    "load_trained",
    "sample_workdir",
    "train_and_evaluate",
]
