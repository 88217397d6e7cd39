"""``notebooks/jaxvae_colab.ipynb`` runs top to bottom, headless, on one CPU device.

The notebook is executed with nbclient in a ``python3`` kernel started with this interpreter
(``sys.executable``: jupyter_client puts it in place of the kernel spec's ``python``; the
runtime cell prints it and the test checks it), with ``JAXVAE_NOTEBOOK_SMOKE=1``: a tiny model,
20 training steps, a temporary workdir and no TensorBoard server (that cell reads the event
file instead). The kernel gets ``JAX_PLATFORMS=cpu`` and *not* the 8 virtual devices of
``conftest.py``: one device compiles and runs fastest, and the notebook is written for any
count. ``PYTHONPATH`` puts this checkout first, so the install cell finds ``jaxvae`` importable
and installs nothing (there is no network here), and the kernel runs the code under test.

Data: the real MNIST files, from ``../shared/data/mnist`` beside the repository (or
``$JAXVAE_MNIST_DIR``); the test is skipped when they are absent. Synthesized IDX files cannot
stand in for them: tensorflow-datasets checks the size and SHA-256 of every file in a
``manual_dir`` against its registered checksums, and jaxvae turns a mismatch into a
``CorruptDatasetFileError``. Preparing all 70,000 images takes about 25 s, half the budget of
this test, so the test prepares only the first ``EXAMPLES_PER_SPLIT`` images of each split
(tensorflow-datasets' ``max_examples_per_split``: the same builder, files and checksums) into a
temporary ``data_dir``, which the notebook gets as ``JAXVAE_NOTEBOOK_DATA_DIR`` and finds
prepared.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "jaxvae_colab.ipynb"
MNIST_DIR = Path(os.environ.get("JAXVAE_MNIST_DIR") or ROOT.parent / "shared" / "data" / "mnist")
MNIST_FILES = [
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
]
EXAMPLES_PER_SPLIT = 512
# Per cell, and for the kernel to start: generous, for a busy machine.
CELL_TIMEOUT_S = int(os.environ.get("JAXVAE_TEST_NOTEBOOK_TIMEOUT_S", "600"))


def _cells_by_tag(nb) -> dict[str, object]:
    return {tag: c for c in nb.cells for tag in c.get("metadata", {}).get("tags", [])}


def _text(cell) -> str:
    """Everything a cell printed (stdout and stderr) plus its text/plain results."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def _mime_types(cell) -> set[str]:
    return {m for out in cell.get("outputs", []) for m in out.get("data", {})}


def test_stored_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert set(_cells_by_tag(nb)) >= {"install", "runtime", "config", "train", "research"}
    assert 'REPO_URL = "https://github.com/jaxvae/jaxvae"' in _cells_by_tag(nb)["install"].source


@pytest.fixture(scope="module")
def mnist_data_dir(tmp_path_factory) -> Path:
    """A tfds ``data_dir`` holding MNIST prepared from the real files, first N of each split."""
    missing = [f for f in MNIST_FILES if not (MNIST_DIR / f).is_file()]
    if missing:
        pytest.skip(f"the real MNIST files are not in {MNIST_DIR} (missing {', '.join(missing)})")
    from jaxvae.data import tf_support

    tfds = tf_support.import_tfds()
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()
    tfds.builder("mnist", data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(MNIST_DIR), max_examples_per_split=EXAMPLES_PER_SPLIT
        )
    )
    return data_dir


def _kernel_env(data_dir: Path, workdir: Path, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    # conftest.py asks for 8 virtual CPU devices; the kernel gets the default, one, and keeps
    # conftest's FAST_COMPILE: the programs of a 20-step run compile several times faster
    # (model.init: 20 s -> 2.5 s of CPU here) and run fast enough.
    env["XLA_FLAGS"] = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the figures
    env.update(
        JAX_PLATFORMS="cpu",
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        IPYTHONDIR=str(tmp / "ipython"),  # no history or profile of the user's
        JAXVAE_NOTEBOOK_SMOKE="1",
        JAXVAE_NOTEBOOK_DATA_DIR=str(data_dir),
        JAXVAE_NOTEBOOK_WORKDIR=str(workdir),
    )
    return env


def test_notebook_runs_top_to_bottom(mnist_data_dir, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "run"
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        startup_timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working folder
    )
    client.execute(env=_kernel_env(mnist_data_dir, workdir, tmp_path))  # raises on a failed cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
    cells = _cells_by_tag(nb)

    assert f"from {ROOT}" in _text(cells["install"])  # this checkout, nothing installed
    runtime = _text(cells["runtime"])
    assert f"python: {sys.executable}\n" in runtime  # the kernel is this interpreter
    assert "backend: cpu" in runtime and "CPU: 1 device(s)" in runtime

    train = _text(cells["train"])
    assert "step: 20\n" in train and "test_neg_elbo: " in train
    assert "Training mnist on 1 device(s) (cpu)" in train
    try:  # tqdm.auto draws a widget where ipywidgets is installed, a text bar otherwise
        import ipywidgets  # noqa: F401

        assert "application/vnd.jupyter.widget-view+json" in _mime_types(cells["train"])
    except ImportError:
        assert "20/20" in train
    assert (workdir / "checkpoints" / "20").is_dir() and (workdir / "results.json").is_file()
    assert "step 20: VAE" in _text(cells["load"])

    for tag in ("grids", "model", "curves"):
        assert "image/png" in _mime_types(cells[tag]), f"no figure from the {tag!r} cell"

    tensorboard = _text(cells["tensorboard"])
    scalars = re.search(r"TensorBoard scalars: (.*)", tensorboard).group(1).split(", ")
    assert {"train_loss", "train_kl", "test_neg_elbo", "test_nll_iwae"} <= set(scalars)
    assert "reconstructions" in re.search(r"TensorBoard images: (.*)", tensorboard).group(1)

    first, last = map(
        float, re.search(r"IWAE bound: (\S+) -> (\S+) nats", _text(cells["research"])).groups()
    )
    assert last > first + 50.0, (first, last)  # the bound goes up (nats per image)
