"""What a run shows and leaves behind: progress, ``metrics.jsonl``, TensorBoard, PNG grids, JSON.

Everything here is host-side and cheap; callers hand over plain Python floats that were fetched
from the devices in one batch (see ``train_lib``), never device arrays inside the hot loop.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from jaxvae import workdir_files


def write_json(path: str | Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically (temp file + rename).

    The temporary file is named after the process, so that two processes writing the same
    file (two evaluations of one workdir) do not write into each other's.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors to TensorBoard.

    On resume from ``start_step``, lines with ``step > start_step`` (written after the restored
    checkpoint by the interrupted run) are dropped first, so the file describes one history.
    Metrics of the step of the last line (an evaluation that a stopped run owed) join that line.
    """

    def __init__(self, workdir: str | Path, start_step: int = 0, tensorboard: bool = True):
        self.path = Path(workdir) / workdir_files.METRICS
        self._kept: list[dict[str, Any]] = []  # until the first write: its last line may join
        if self.path.exists():  # a damaged file raises workdir_files.DamagedFileError
            records = workdir_files.read_jsonl(self.path)
            self._kept = [r for r in records if r.get("step", 0) <= start_step]
            self._rewrite()
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 - heavy import, optional

            self._tb = SummaryWriter(logdir=str(workdir), purge_step=start_step or None)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": int(step), **{k: _to_float(v) for k, v in metrics.items()}}
        if self._kept and self._kept[-1].get("step") == record["step"]:
            self._kept[-1].update(record)
            self._file.close()
            self._rewrite()
            self._file = self.path.open("a")
        else:
            self._file.write(json.dumps(record) + "\n")
        self._kept = []
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def _rewrite(self) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self._kept))

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _to_float(v: Any) -> Any:
    if isinstance(v, int | str):
        return v
    return float(v)


class Progress:
    """A tqdm bar (step, loss, images/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        batch_size: int,
        stream: TextIO | None = None,
        use_bar: bool | None = None,
    ):
        self.stream = stream or sys.stderr
        self.total, self.batch_size = total_steps, batch_size
        if use_bar is None:
            use_bar = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if use_bar:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
            )
        self._step = start_step

    def update(self, step: int) -> None:
        """Called every step (no device sync): advances the bar."""
        if self._bar is not None:
            self._bar.update(step - self._step)
        self._step = step

    def log(self, step: int, metrics: dict[str, float], images_per_second: float) -> None:
        """Called at log steps with host values."""
        eta = (self.total - step) * self.batch_size / images_per_second if images_per_second else 0
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4g}", img_s=f"{images_per_second:.0f}", refresh=False
            )
            return
        print(
            f"step {step}/{self.total}  loss {metrics['loss']:.4f}  "
            f"neg_elbo {metrics.get('neg_elbo', float('nan')):.4f}  "
            f"kl {metrics.get('kl', float('nan')):.4f}  "
            f"images/s {images_per_second:.0f}  "
            f"ETA {datetime.timedelta(seconds=int(eta))}",
            file=self.stream,
            flush=True,
        )

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Timer:
    """Training throughput, excluding evaluation, checkpointing and the first (compiling) window.

    Windows end at log steps (right after the one device sync of the window). Time spent in
    evaluation or saving inside a window is removed with :meth:`exclude`.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self._start = time.perf_counter()
        self._excluded = 0.0
        self._first: tuple[int, float] | None = None

    def exclude(self, seconds: float) -> None:
        """Do not count ``seconds`` (spent evaluating or saving) in the current window."""
        self._excluded += seconds

    def mark(self, images: int) -> float:
        """Ends a window of ``images`` trained images (after a device sync); returns its rate."""
        now = time.perf_counter()
        dt = max(now - self._start - self._excluded, 1e-9)
        self._start, self._excluded = now, 0.0
        if self._first is None:  # compilation happens in the first window: kept apart
            self._first = (images, dt)
        else:
            self.seconds += dt
            self.images += images
        return images / dt

    @property
    def images_per_second(self) -> float:
        """Mean over all windows but the first; the first window's rate if it is the only one."""
        if self.seconds > 0:
            return self.images / self.seconds
        if self._first is not None:
            return self._first[0] / self._first[1]
        return float("nan")


def to_display(images: np.ndarray, pixel_range: str) -> np.ndarray:
    """Model-space images -> [0, 1] floats (``symmetric`` data live in [-1, 1])."""
    images = np.asarray(images, np.float32)
    if pixel_range == "symmetric":
        images = (images + 1.0) / 2.0
    return np.clip(images, 0.0, 1.0)


def image_grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """``[N, H, W, C]`` in [0, 1] -> one ``uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, 3]`` grid."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=-1)
    rows = math.ceil(n / ncol)
    grid = np.ones((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), np.float32)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | Path, grid: np.ndarray) -> None:
    """Writes a ``uint8 [H, W, 3]`` array as PNG."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def interleave_rows(inputs: np.ndarray, outputs: np.ndarray, ncol: int) -> np.ndarray:
    """Rows of ``ncol`` inputs followed by the row of their reconstructions: ``[2N, H, W, C]``."""
    n = (inputs.shape[0] // ncol) * ncol
    a = inputs[:n].reshape(-1, ncol, *inputs.shape[1:])
    b = outputs[:n].reshape(-1, ncol, *outputs.shape[1:])
    return np.stack([a, b], axis=1).reshape(-1, *inputs.shape[1:])


__all__ = [
    "MetricsWriter",
    "Progress",
    "Timer",
    "image_grid",
    "interleave_rows",
    "save_png",
    "to_display",
    "write_json",
]
