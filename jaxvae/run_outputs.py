"""What a run shows of its model: evaluation over the eval split, picture grids, test metrics.

Used by the training loop (:mod:`jaxvae.train_lib`, at every evaluation) and by the use of a
trained workdir (:mod:`jaxvae.inference`); each function takes the :class:`~jaxvae.run_setup.Setup`
of the run. Evaluation noise comes from :func:`eval_key`, never from the training noise.
"""

from __future__ import annotations

import datetime
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxvae import evaluate, input_pipeline, reporting
from jaxvae import train_state as ts
from jaxvae.run_setup import Setup

# Offset folded into the seed for evaluation noise: evaluation never consumes training noise,
# so evaluating more or less often does not change the training run.
_EVAL_KEY_SALT = 0x5EED


def eval_key(config: ml_collections.ConfigDict) -> jax.Array:
    return jax.random.PRNGKey(config.seed + _EVAL_KEY_SALT)


def eval_batch_size(s: Setup) -> int:
    """``config.eval.batch_size`` rounded up to a multiple of the device count (padding masked)."""
    n = s.mesh.size
    return -(-s.config.eval.batch_size // n) * n


def eval_progress(s: Setup) -> Callable[[int, float], None]:
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


def run_eval(
    s: Setup, eval_step, state: ts.TrainState, should_stop: Callable[[], bool] | None = None
) -> dict[str, float]:
    """:func:`jaxvae.evaluate.evaluate` of ``state`` on the eval split (``should_stop``: see
    there)."""
    batches = input_pipeline.create_eval_batches(s.config.data, eval_batch_size(s))
    num_dims = math.prod(s.info.image_shape)
    return evaluate.evaluate(
        eval_step,
        state.variables,
        batches,
        s.mesh,
        eval_key(s.config),
        num_dims,
        progress=eval_progress(s),
        should_stop=should_stop,
    )


def first_eval_images(s: Setup, count: int) -> np.ndarray:
    """Up to ``count`` real images from the start of the eval split (for the picture grids).

    Read as by a single process (all rows), so the pictures do not depend on the process count.
    """
    out = []
    for batch in input_pipeline.create_eval_batches(s.config.data, eval_batch_size(s), 0, 1):
        out.append(np.asarray(batch["image"])[np.asarray(batch["mask"], bool)])
        if sum(len(o) for o in out) >= count:
            break
    return np.concatenate(out)[:count]


def save_images(
    s: Setup,
    state: ts.TrainState,
    step: int,
    writer: reporting.MetricsWriter | None,
    folder: str = "images",
) -> list[Path]:
    """Writes reconstructions, prior samples and interpolations as PNG grids; returns paths.

    Without the dataset (``s.info`` is None, see :func:`jaxvae.run_setup.setup`) there are no
    images to reconstruct or interpolate: prior samples only.
    """
    cfg = s.config.eval
    n = cfg.num_image_grid
    pixel_range = "unit" if s.config.model.likelihood == "bernoulli" else s.config.data.pixel_range
    # Pictures run on one device with the replicated variables.
    variables = jax.device_get(state.variables)
    if s.info is None:
        x = np.zeros((0, *s.programs.model.image_shape), np.float32)
    else:
        x = first_eval_images(s, 4 * n)
    key = jax.random.fold_in(eval_key(s.config), step)
    out = jax.device_get(s.programs.pictures(variables, x, key))
    show = lambda a: reporting.to_display(np.asarray(a), pixel_range)  # noqa: E731
    grids = {}
    if len(x):
        recons = reporting.interleave_rows(show(x), show(out["reconstructions"]), n)
        grids["reconstructions"] = (recons, n)
    grids["samples"] = (show(out["samples"]), n)
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


def as_test_metrics(ev: dict[str, float]) -> dict[str, float]:
    """The ``test_*`` entries of ``metrics.jsonl`` and the results files, from an evaluation."""
    return {
        "test_neg_elbo": ev["neg_elbo"],
        "test_kl": ev["kl"],
        "test_reconstruction": ev["reconstruction"],
        "test_nll_iwae": ev["nll_iwae"],
        "test_bits_per_dim": ev["bits_per_dim"],
        "test_bits_per_dim_elbo": ev["bits_per_dim_elbo"],
    }


def finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf -> None so results.json is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


__all__ = [
    "as_test_metrics",
    "eval_batch_size",
    "eval_key",
    "eval_progress",
    "finite",
    "first_eval_images",
    "run_eval",
    "save_images",
]
