"""The training loop: train a workdir's run with periodic evaluation and checkpoints.

:func:`train_and_evaluate` (what ``train.py`` runs) takes the workdir's lock, sets the run up
(:func:`jaxvae.run_setup.setup`: every check before anything is written), resumes from the
latest checkpoint if there is one, trains to the last step with log lines, ``metrics.jsonl``,
evaluations and picture grids (:mod:`jaxvae.run_outputs`) and checkpoints, stops on a
non-finite loss (:class:`TrainingDivergedError`) or a signal, and writes ``results.json``.
Using a trained workdir (``--mode eval|sample``, ``load_trained``) is :mod:`jaxvae.inference`.

Workdir: ``config.json`` (resolved config), ``metrics.jsonl``, TensorBoard event files,
``checkpoints/<step>/``, ``images/*.png``, ``results.json``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxvae import (
    checkpointing,
    config_utils,
    distributed,
    host_memory,
    input_pipeline,
    preemption,
    reporting,
    run_setup,
    workdir_lock,
)
from jaxvae.evaluate import EvaluationStopped
from jaxvae.mesh import shard_batch
from jaxvae.run_outputs import as_test_metrics, finite, run_eval, save_images
from jaxvae.run_setup import Setup


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
    ``input_pipeline.DatasetNotFoundError``, :class:`~jaxvae.run_setup.WorkdirMismatchError`,
    ``checkpointing.CheckpointError``, ``workdir_lock.WorkdirBusyError``,
    ``workdir_files.DamagedFileError``.
    """
    workdir = Path(workdir)
    run_setup.check_writable(workdir)
    with _workdir_lock(workdir) as release:
        s = run_setup.setup(config, workdir, for_training=True)
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
    s: Setup, progress_stream, progress_bar: bool | None, release_lock: Callable[[], None]
) -> dict[str, Any]:
    """The body of :func:`train_and_evaluate`, once the workdir is held and checked."""
    cfg = s.config
    workdir = s.workdir
    num_steps = s.num_train_steps
    manager = checkpointing.create_manager(workdir / "checkpoints", cfg.keep_checkpoints)
    start_step = 0
    data_state = None
    latest = manager.latest_step()
    if latest == num_steps and not _evaluation_owed(manager, latest, cfg, num_steps):
        finished = _finished_results(workdir, num_steps)
        if finished is not None:  # the same command again: nothing to restore, train or write
            manager.close()
            print(
                f"{workdir} is already trained to its last step, {num_steps}; its results are "
                f"in {workdir / 'results.json'} (--mode eval evaluates it again).",
                file=progress_stream or sys.stderr,
                flush=True,
            )
            return finished
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
    if data_state:  # a converted model's checkpoint (jaxvae.convert) holds no data position
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
    eval_stopped = False  # a signal came before the evaluation of the last step saved ended
    stop = preemption.StopSignal(on_abort=release_lock)

    def evaluate_and_record(state: Any, done: int) -> dict[str, float] | None:
        """Evaluates ``state`` of step ``done``, shows it, saves its pictures; None when a
        signal stopped the evaluation."""
        try:
            ev = run_eval(s, eval_step, state, should_stop=stop.reached)
        except EvaluationStopped:
            progress.message(f"The evaluation of step {done} was stopped before its end.")
            return None
        _check_finite([ev], done - 1, s, saved_step, prefix="test_")
        if is_main:
            save_images(s, state, done, writer)
        progress.message(
            f"eval step {done}: neg_elbo {ev['neg_elbo']:.3f}  kl {ev['kl']:.3f}  "
            f"nll_iwae(K={cfg.eval.iwae_samples}) {ev['nll_iwae']:.3f}  "
            f"bits/dim {ev['bits_per_dim']:.4f}"
        )
        return as_test_metrics(ev)

    # Signals are handled until every save has been written (a second Ctrl-C aborts at once).
    with stop:
        try:
            if _evaluation_owed(manager, start_step, cfg, num_steps):
                # The run that saved this step was stopped during its evaluation: do it now.
                t0 = time.perf_counter()
                last_eval = evaluate_and_record(state, start_step)
                timer.exclude(time.perf_counter() - t0)  # not in the first window's images/s
                eval_stopped = last_eval is None
                if last_eval is not None and writer is not None:
                    writer.write(start_step, last_eval)  # joins that step's training metrics
            # No step when a signal stopped that evaluation again.
            for step in range(start_step, start_step if eval_stopped else num_steps):
                batch = next(train_iter)
                state, metrics = train_step(state, shard_batch(batch["image"], s.mesh))
                pending.append(metrics)
                done = step + 1
                progress.update(done)
                is_last = done == num_steps
                stopping = stop.reached()  # every process stops at the same step
                do_log = done % cfg.log_every_steps == 0 or is_last or stopping
                eval_due = _is_eval_step(done, cfg, num_steps)
                eval_stopped = eval_due and stopping  # owed: the resumed run does it first
                do_eval = eval_due and not stopping
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
                    try:
                        ev = evaluate_and_record(state, done)
                    except jax.errors.JaxRuntimeError as e:
                        # Out of memory in the evaluation: the step itself is good. Saved
                        # without its evaluation (owed, as after a signal) where no other
                        # process is waiting in the evaluation's collectives.
                        if is_out_of_memory(e) and jax.process_count() == 1:
                            checkpointing.save(manager, done, state, train_iter.get_state())
                        raise
                    if ev is None:  # stopped: save this step without its evaluation
                        eval_stopped, stopping, do_eval, do_ckpt = True, True, False, True
                    else:
                        last_eval = ev
                        record.update(last_eval)
                if record and writer is not None:
                    writer.write(done, record)
                if is_last and not eval_stopped:
                    # Before the last save, so a checkpoint that cannot be written loses no
                    # result.
                    results = _results(s, done, last_eval, timer)
                    if is_main:
                        reporting.write_json(workdir / "results.json", finite(results))
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
    if stop.requested and (final_step < num_steps or eval_stopped):
        raise preemption.Preempted(
            f"Stopped by {stop.signal_name} at step {final_step} of {num_steps}: checkpoint "
            f"saved in {workdir / 'checkpoints' / str(final_step)}. "
            + (
                "Its evaluation is still to do: it runs first when you run"
                if eval_stopped
                else "Run"
            )
            + " the same command again to resume from there.",
            stop.exit_code,
        )
    if results is None:  # nothing left to train: evaluate what was restored (unless owed)
        if last_eval is None:
            last_eval = as_test_metrics(run_eval(s, eval_step, state))
        results = _results(s, final_step, last_eval, timer)
        if is_main:
            reporting.write_json(workdir / "results.json", finite(results))
    return results


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is XLA's ``RESOURCE_EXHAUSTED``: a device out of memory."""
    return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def _finished_results(workdir: Path, step: int) -> dict[str, Any] | None:
    """``results.json`` of a run that finished at ``step``, as process 0 reads it (every
    process returns the same); None when it is missing, damaged or of another step."""
    text = ""
    if jax.process_index() == 0:
        try:
            text = (workdir / "results.json").read_text()
            results = json.loads(text)
            if not (isinstance(results, dict) and results.get("step") == step):
                text = ""
        except (OSError, ValueError):
            text = ""
    text = distributed.allgather_texts(text)[0]
    return json.loads(text) if text else None


def _is_eval_step(step: int, cfg: ml_collections.ConfigDict, num_steps: int) -> bool:
    """Every ``eval_every_steps`` steps, and the last step."""
    return step % cfg.eval_every_steps == 0 or step == num_steps


def _evaluation_owed(
    manager: Any, step: int, cfg: ml_collections.ConfigDict, num_steps: int
) -> bool:
    """The checkpoint of ``step`` was saved by a run stopped during that step's evaluation:
    an evaluation step whose checkpoint holds no metrics (every finished one does)."""
    return step > 0 and _is_eval_step(step, cfg, num_steps) and manager.metrics(step) is None


class TrainingDivergedError(RuntimeError):
    """A loss, gradient or test metric became NaN/inf; nothing from that step on was saved."""


def _check_finite(
    window: list[dict[str, Any]],
    first_step: int,
    s: Setup,
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
    s: Setup, step: int, last_eval: dict[str, float] | None, timer: reporting.Timer
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


__all__ = ["TrainingDivergedError", "is_out_of_memory", "train_and_evaluate"]
