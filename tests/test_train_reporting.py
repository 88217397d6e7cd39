"""Host-side reporting: progress output, metrics.jsonl on resume, PNG grids (no JAX)."""

import io
import json

import numpy as np
from PIL import Image

from jaxvae import reporting


def test_progress_log_lines_when_not_a_terminal():
    out = io.StringIO()  # not a TTY -> plain lines
    p = reporting.Progress(total_steps=100, start_step=0, batch_size=10, stream=out)
    p.update(50)
    p.log(50, {"loss": 1.5, "neg_elbo": 1.5, "kl": 0.25}, images_per_second=100.0)
    p.close()
    line = out.getvalue().strip()
    # 50 steps left x 10 images at 100 images/s = 5 s.
    assert line == "step 50/100  loss 1.5000  neg_elbo 1.5000  kl 0.2500  images/s 100  ETA 0:00:05"


def test_progress_bar_on_a_terminal():
    out = io.StringIO()
    p = reporting.Progress(total_steps=10, start_step=2, batch_size=4, stream=out, use_bar=True)
    p.update(5)
    p.log(5, {"loss": 3.0}, images_per_second=8.0)
    p.update(6)
    p.close()
    text = out.getvalue()
    assert "6/10" in text and "loss=3" in text and "img_s=8" in text


def test_metrics_jsonl_drops_lines_after_the_restored_step(tmp_path):
    w = reporting.MetricsWriter(tmp_path, tensorboard=False)
    for step in (10, 20, 30):
        w.write(step, {"train_loss": float(step), "n": 1})
    w.close()
    w = reporting.MetricsWriter(tmp_path, start_step=20, tensorboard=False)
    w.write(30, {"train_loss": 0.5})
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train_loss"]) for r in lines] == [(10, 10.0), (20, 20.0), (30, 0.5)]


def test_metrics_jsonl_joins_an_owed_evaluation_to_the_restored_step(tmp_path):
    """A run stopped during step 20's evaluation wrote step 20's training metrics only; the
    resumed run's evaluation of step 20 joins that line, later lines are appended."""
    w = reporting.MetricsWriter(tmp_path, tensorboard=False)
    for step in (10, 20):
        w.write(step, {"train_loss": float(step)})
    w.close()
    w = reporting.MetricsWriter(tmp_path, start_step=20, tensorboard=False)
    w.write(20, {"test_neg_elbo": 7.0})
    w.write(30, {"train_loss": 0.5})
    w.write(30, {"test_neg_elbo": 6.0})  # not a resume: a line of its own
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 10, "train_loss": 10.0},
        {"step": 20, "train_loss": 20.0, "test_neg_elbo": 7.0},
        {"step": 30, "train_loss": 0.5},
        {"step": 30, "test_neg_elbo": 6.0},
    ]


def test_image_grid_layout_and_png(tmp_path):
    images = np.zeros((5, 2, 3, 1), np.float32)
    images[1] = 1.0
    grid = reporting.image_grid(images, ncol=3, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3) and grid.dtype == np.uint8
    assert (grid[1:3, 5:8] == 255).all() and (grid[1:3, 1:4] == 0).all()
    assert (grid[0] == 255).all()  # padding is white
    path = tmp_path / "g.png"
    reporting.save_png(path, grid)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)


def test_interleave_rows_puts_reconstructions_under_inputs():
    x = np.arange(4).reshape(4, 1, 1, 1).astype(np.float32)
    y = x + 10
    out = reporting.interleave_rows(x, y, ncol=2)
    np.testing.assert_array_equal(out.ravel(), [0, 1, 10, 11, 2, 3, 12, 13])


def test_to_display_maps_symmetric_range():
    np.testing.assert_allclose(
        reporting.to_display(np.array([-1.0, 0.0, 1.0, 2.0]), "symmetric"), [0, 0.5, 1, 1]
    )
    np.testing.assert_allclose(reporting.to_display(np.array([-0.5, 0.5]), "unit"), [0, 0.5])
