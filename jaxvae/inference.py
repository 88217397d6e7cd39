"""Using a trained workdir: evaluate it, draw its pictures, or load its model for your code.

- :func:`evaluate_workdir` evaluates the latest or best checkpoint (``--mode eval``).
- :func:`sample_workdir` writes prior samples (and reconstructions) of a checkpoint
  (``--mode sample``).
- :func:`load_trained` returns a workdir's trained model and variables, for your own code.

Each reads the workdir through :func:`jaxvae.run_setup.setup` (every check first) and a
read-only checkpoint manager; none changes the checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxvae import checkpointing, reporting, run_outputs, run_setup, workdir_files
from jaxvae import train_state as ts
from jaxvae.run_setup import Setup

# Reading a workdir a run is training in: how often a checkpoint may vanish under the reader
# (the run deletes its older ones) before it gives up.
_READ_ATTEMPTS = 3


def _restore_for_inference(
    config: ml_collections.ConfigDict, workdir: str | Path, which: str, needs_data: bool = True
) -> tuple[Setup, ts.TrainState, int]:
    """The set-up of a trained workdir and its ``latest``/``best`` checkpoint: ``(s, state,
    step)``. The caller closes ``s.manager``.

    The workdir may be one a run is still training in: a checkpoint that run deletes while it
    is read is replaced by the latest (best) one there then (in a single process)."""
    if which not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest' or 'best', got {which!r}")
    s = run_setup.setup(config, workdir, for_training=False, needs_data=needs_data)
    attempts = _READ_ATTEMPTS
    while True:
        step = s.manager.latest_step() if which == "latest" else s.manager.best_step()
        if step is None:
            latest = s.manager.latest_step()
            checkpointing.close(s.manager)
            if which == "best" and latest is not None:
                raise checkpointing.CheckpointError(
                    f"No checkpoint in {s.workdir / 'checkpoints'} has been evaluated yet, so "
                    f"there is no best one; use --checkpoint latest (step {latest})."
                )
            raise checkpointing.CheckpointError(
                f"No checkpoint in {s.workdir / 'checkpoints'}: train first."
            )
        try:
            state, _ = checkpointing.restore(s.manager, step, s.target)
            return s, state, step
        except checkpointing.CheckpointGoneError:
            # A run training in this workdir deleted it: take the latest (best) one of those
            # there now. One process only: several would each have to pick the same step.
            attempts -= 1
            if attempts == 0 or jax.process_count() > 1:
                checkpointing.close(s.manager)
                raise
            s.manager.reload()


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
        ev = run_outputs.run_eval(s, eval_step, state)
        results = {
            "step": step,
            "checkpoint": which,
            **run_outputs.as_test_metrics(ev),
            "iwae_samples": s.config.eval.iwae_samples,
            "num_examples": ev["num_examples"],
            "eval_split": s.config.data.eval_split,
            "eval_seconds": time.perf_counter() - t0,
        }
        if jax.process_index() == 0:  # every process computed the same (replicated) sums
            reporting.write_json(s.workdir / "eval_results.json", run_outputs.finite(results))
            with history.open("a") as f:
                f.write(json.dumps(run_outputs.finite(results), sort_keys=True) + "\n")
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
    config must describe the workdir's model (its ``config.json``; another model is refused
    with :class:`~jaxvae.run_setup.WorkdirMismatchError`). Nothing in the workdir is changed.
    For example::

        model, variables, step = load_trained(config, "runs/mnist")
        # Under jax.jit each is one compiled program (outside it, one per primitive).
        reconstruct = jax.jit(functools.partial(model.apply, method="reconstruct"))
        images = reconstruct(variables, x)  # x: [N, H, W, C]
        samples = jax.jit(lambda v, key: model.apply(v, key, 16, method="sample"))(
            variables, jax.random.key(0)
        )

    Raises ``checkpointing.CheckpointError`` when the workdir has no (evaluated, for ``best``)
    checkpoint, ``ValueError`` for another ``which``. The dataset is never downloaded and need
    not be here: the image shape comes from tensorflow-datasets' description of it (only a
    dataset whose images vary in size needs its data).
    """
    s, state, step = _restore_for_inference(config, workdir, which, needs_data=False)
    try:
        variables = jax.device_get(state.variables)
    finally:
        checkpointing.close(s.manager)
    return s.programs.model, variables, int(step)


def sample_workdir(
    config: ml_collections.ConfigDict, workdir: str | Path, which: str = "latest"
) -> list[Path]:
    """Writes the PNG grids of a checkpoint to ``<workdir>/samples/``; returns their paths.

    Prior samples, and reconstructions and interpolations of the first eval images when the
    dataset is here (prepared, or in ``config.data.manual_dir``: it is never downloaded);
    without it (a converted model, a copied workdir), prior samples only.
    """
    s, state, step = _restore_for_inference(config, workdir, which, needs_data=False)
    try:
        # A folder of its own: never overwrite the pictures written during training.
        # Process 0 alone draws them (on one of its devices, from the replicated variables).
        is_main = jax.process_index() == 0
        paths = run_outputs.save_images(s, state, step, None, folder="samples") if is_main else []
    finally:
        checkpointing.close(s.manager)
    return paths


__all__ = ["evaluate_workdir", "load_trained", "sample_workdir"]
