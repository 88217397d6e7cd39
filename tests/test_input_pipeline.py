"""Tests of jaxvae.input_pipeline: resume, epochs, shards, binarization, eval masks, offline errors.

The tfds path runs on `tfds.testing.mock_data` (through `multiprocess_launcher.mock_data`); the
offline path on files written here. Real MNIST (../shared/data/mnist, or $JAXVAE_MNIST_DIR) is
only validated when the folder exists, and fully prepared with tfds only when
JAXVAE_TEST_REAL_DATA=1 (about 30 s).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
import struct

import numpy as np
import pytest
from multiprocess_launcher import mock_data, no_network

from jaxvae import config_utils, input_pipeline
from jaxvae.data import memory, prepare, tf_support, transforms

MNIST_FILES = [
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
]
REAL_MNIST_DIR = pathlib.Path(
    os.environ.get(
        "JAXVAE_MNIST_DIR",
        pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist",
    )
)


def indexed_images(n: int, shape=(3, 3, 1)) -> np.ndarray:
    """uint8 [n, *shape] whose every pixel of example i equals i (n <= 256)."""
    assert n <= 256
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, *shape)).copy()


def decode_index(batch_images: np.ndarray) -> np.ndarray:
    """Inverse of `indexed_images` after 'unit' scaling: [L, H, W, C] -> [L] int."""
    return np.rint(batch_images[:, 0, 0, 0] * 255).astype(int)


def data_config(**fields):
    """config.data: `config_utils.base_config()`'s defaults (binarize='dynamic'), then `fields`."""
    data = config_utils.base_config().data
    data.update(fields)
    return data


def train_iter(images, global_batch, seed, pi=0, pc=1, **pixels):
    """In-memory training iterator over `images` (pixels: binarize, pixel_range, max_value)."""
    spec = transforms.BatchSpec(global_batch, pi, pc, **pixels)
    return memory.InMemoryTrainIterator(images, seed, spec)


def eval_batches(images, batch, pi=0, pc=1, **pixels):
    return memory.eval_batches(images, transforms.BatchSpec(batch, pi, pc, **pixels))


# --- in-memory NumPy pipeline ------------------------------------------------------------


@pytest.mark.parametrize("binarize", ["dynamic", "none"])
def test_resume_gives_the_same_batches(binarize):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
    # batch 8 over 50 examples: batches straddle epoch boundaries
    it = train_iter(images, 8, seed=7, binarize=binarize)
    for _ in range(9):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
    expected = [next(it)["image"] for _ in range(10)]
    resumed = train_iter(images, 8, seed=7, binarize=binarize)
    first = next(resumed)["image"]  # a fresh iterator's position is overwritten
    resumed.set_state(state)
    got = [next(resumed)["image"] for _ in range(10)]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
    assert not np.array_equal(first, expected[0])


def test_different_seed_gives_different_order():
    images = indexed_images(50)
    a = train_iter(images, 10, seed=1)
    b = train_iter(images, 10, seed=2)
    assert not np.array_equal(a.next_indices(), b.next_indices())


@pytest.mark.parametrize("batch", [10, 8, 64])
def test_every_epoch_covers_every_example_exactly_once(batch):
    n = 50
    it = train_iter(indexed_images(n), batch, seed=3)
    num_epochs = 4
    stream = np.concatenate(
        [decode_index(next(it)["image"]) for _ in range(-(-num_epochs * n // batch))]
    )
    epochs = [stream[e * n : (e + 1) * n] for e in range(num_epochs)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


@pytest.mark.parametrize("n", [48, 40])
def test_process_shards_are_disjoint_and_cover_each_global_batch(n):
    global_batch, pc = 12, 4
    its = [train_iter(indexed_images(n), global_batch, 5, pi, pc) for pi in range(pc)]
    single = train_iter(indexed_images(n), global_batch, 5)
    for _ in range(12):  # 3 epochs of 48, 3.6 of 40
        shards = [next(it)["image"] for it in its]
        assert all(len(shard) == global_batch // pc for shard in shards)  # local batch size
        flat = np.concatenate([decode_index(shard) for shard in shards])
        # The processes' rows, in process order, are exactly the single-process global batch.
        np.testing.assert_array_equal(flat, decode_index(next(single)["image"]))
        if n % global_batch == 0:  # no batch straddles two epochs: shards share no example
            assert len(set(flat.tolist())) == global_batch


def test_binarization_mean_matches_pixel_probability():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    it = train_iter(images, 16, seed=11, binarize="dynamic")
    num_epochs = 50
    bits = np.stack([next(it)["image"] for _ in range(num_epochs * 4)])
    assert set(np.unique(bits).tolist()) == {0.0, 1.0}
    p = images.astype(np.float64) / 255
    # Each epoch holds every example once, so the bit total estimates num_epochs * sum(p).
    var = num_epochs * np.sum(p * (1 - p))
    assert abs(bits.sum() - num_epochs * p.sum()) < 5 * np.sqrt(var)
    # Per pixel: Bernoulli(p) exactly at the extremes, Monte-Carlo close elsewhere.
    reps = 4000
    grey = np.array([0, 1, 64, 128, 200, 255], np.uint8).reshape(1, 6, 1, 1)
    draws = transforms.binarize(np.repeat(grey, reps, 0), transforms.make_rng(0, 1))
    q = grey[0, :, 0, 0] / 255
    mean = draws.mean(0)[:, 0, 0]
    assert mean[0] == 0 and mean[-1] == 1
    np.testing.assert_array_less(np.abs(mean - q), 5 * np.sqrt(q * (1 - q) / reps) + 1e-12)


def test_binarization_differs_between_batches_and_is_seeded():
    images = np.full((16, 8, 8, 1), 128, np.uint8)
    a = train_iter(images, 16, seed=0, binarize="dynamic")
    b = train_iter(images, 16, seed=0, binarize="dynamic")
    a1, a2 = next(a)["image"], next(a)["image"]
    assert not np.array_equal(a1, a2)
    np.testing.assert_array_equal(a1, next(b)["image"])


@pytest.mark.parametrize("pc", [1, 2, 3])
def test_eval_batches_cover_the_split_once_with_mask(pc):
    n, batch = 53, 12
    images = indexed_images(n)
    runs = [list(eval_batches(images, batch, pi, pc)) for pi in range(pc)]
    assert len({len(r) for r in runs}) == 1  # same number of batches on every process
    assert len(runs[0]) == -(-n // batch)
    seen = []
    for r in runs:
        for b in r:
            assert b["image"].shape == (batch // pc, 3, 3, 1) and b["image"].dtype == np.float32
            assert b["mask"].dtype == bool
            assert np.all(b["image"][~b["mask"]] == 0)
            seen.extend(decode_index(b["image"][b["mask"]]).tolist())
    assert sorted(seen) == list(range(n))
    if pc == 1:
        assert seen == list(range(n))  # in order


def test_eval_binarization_is_fixed():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (30, 5, 5, 1), dtype=np.uint8)
    a = np.concatenate([b["image"] for b in eval_batches(images, 10, binarize="dynamic")])
    b = np.concatenate([b["image"][b["mask"]] for b in eval_batches(images, 7, binarize="dynamic")])
    np.testing.assert_array_equal(a, b)  # same bits for any batch size and every evaluation
    assert set(np.unique(a).tolist()) == {0.0, 1.0}


def test_pixel_range_scaling():
    x = np.array([0, 51, 255], np.uint8)
    np.testing.assert_allclose(transforms.scale(x, "unit"), [0.0, 0.2, 1.0], atol=1e-7)
    np.testing.assert_allclose(transforms.scale(x, "symmetric"), [-1.0, -0.6, 1.0], atol=1e-6)
    np.testing.assert_array_equal(transforms.scale(np.array([0, 1], np.uint8), "unit", 1), [0, 1])
    with pytest.raises(ValueError, match="pixel_range='zero_one'"):
        transforms.BatchSpec(8, binarize="none", pixel_range="zero_one")
    with pytest.raises(ValueError, match="binarize='static'"):
        transforms.BatchSpec(8, binarize="static", pixel_range="unit")


def test_batch_not_divisible_by_processes_raises():
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        train_iter(indexed_images(10), 10, seed=0, pc=3)
    with pytest.raises(ValueError, match="not divisible"):  # before any dataset work
        input_pipeline.create_train_iterator(
            data_config(), 10, seed=0, process_index=0, process_count=4
        )
    with pytest.raises(ValueError, match="not divisible"):
        input_pipeline.create_eval_batches(data_config(), 10, process_index=0, process_count=4)


def test_set_state_rejects_a_different_layout():
    it = train_iter(indexed_images(20), 4, seed=0)
    state = it.get_state()
    other = train_iter(indexed_images(20), 8, seed=0)
    with pytest.raises(ValueError, match="global_batch_size"):
        other.set_state(state)


# --- public API on tfds.testing.mock_data -------------------------------------------------


def test_public_api_on_mock_mnist():
    cfg = data_config(name="mnist", binarize="dynamic")
    with mock_data(num_examples=20):
        info = input_pipeline.get_dataset_info(cfg)
        assert info == input_pipeline.DatasetInfo((28, 28, 1), 20, 20, "mnist")
        it = input_pipeline.create_train_iterator(cfg, 8, seed=0, process_index=0, process_count=1)
        first = [next(it)["image"] for _ in range(3)]
        state = it.get_state()
        expected = [next(it)["image"] for _ in range(4)]
        it2 = input_pipeline.create_train_iterator(cfg, 8, seed=0, process_index=0, process_count=1)
        it2.set_state(state)
        for e in expected:
            np.testing.assert_array_equal(e, next(it2)["image"])
        assert first[0].shape == (8, 28, 28, 1) and first[0].dtype == np.float32
        assert set(np.unique(np.stack(first)).tolist()) == {0.0, 1.0}
        batches = list(
            input_pipeline.create_eval_batches(cfg, 16, process_index=0, process_count=1)
        )
        assert [int(b["mask"].sum()) for b in batches] == [16, 4]
        unit = data_config(binarize="none", pixel_range="symmetric")
        x = next(input_pipeline.create_train_iterator(unit, 8, 0, 0, 1))["image"]
        assert x.min() >= -1 and x.max() <= 1 and len(np.unique(x)) > 2


def test_binarized_mnist_keeps_its_fixed_bits():
    cfg = data_config(name="binarized_mnist", binarize="none", pixel_range="unit")
    with mock_data(num_examples=12, max_value=2):  # values in {0, 1}
        x = next(input_pipeline.create_train_iterator(cfg, 12, 0, 0, 1))["image"]
        assert set(np.unique(x).tolist()) == {0.0, 1.0}  # {0, 1} stored, not divided by 255
    with mock_data(num_examples=12):  # grey levels are not binarized_mnist data
        with pytest.raises(ValueError, match="max_value=2"):  # info decodes nothing: read data
            input_pipeline.create_train_iterator(cfg, 12, 0, 0, 1)


def test_streaming_celeba_on_mock_data():
    cfg = data_config(
        name="celeb_a",
        in_memory=False,
        center_crop=148,
        image_size=16,
        binarize="none",
        pixel_range="symmetric",
        shuffle_buffer=8,
    )
    with mock_data(num_examples=6):
        info = input_pipeline.get_dataset_info(cfg)
        assert info.image_shape == (16, 16, 3) and info.num_train == 6
        it = input_pipeline.create_train_iterator(cfg, 2, seed=4, process_index=0, process_count=1)
        [next(it) for _ in range(4)]  # crosses an epoch boundary (3 batches per epoch)
        state = it.get_state()
        expected = [next(it)["image"] for _ in range(3)]
        assert expected[0].shape == (2, 16, 16, 3) and expected[0].dtype == np.float32
        assert expected[0].min() >= -1 and expected[0].max() <= 1
        it2 = input_pipeline.create_train_iterator(cfg, 2, seed=4, process_index=0, process_count=1)
        it2.set_state(json.loads(json.dumps(state)))
        for e in expected:
            np.testing.assert_array_equal(e, next(it2)["image"])
        batches = list(input_pipeline.create_eval_batches(cfg, 4, process_index=0, process_count=1))
        assert [int(b["mask"].sum()) for b in batches] == [4, 2]
        assert np.all(batches[1]["image"][2:] == 0)


def test_center_crop_resize_matches_pil():
    from PIL import Image

    tf = tf_support.import_tf()
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
    got = tf_support.crop_resize(tf.constant(image), 148, 64).numpy()
    top, left = (218 - 148) // 2, (178 - 148) // 2  # PyTorch-VAE CelebA: CenterCrop(148)
    ref = Image.fromarray(image).crop((left, top, left + 148, top + 148))
    ref = np.asarray(ref.resize((64, 64), Image.BILINEAR))
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    assert diff.max() <= 1 and diff.mean() < 0.25  # PIL and TF round differently


# --- a real (tiny) tfds dataset prepared here: real split slicing, no mocking ------------------


@pytest.fixture(scope="module")
def indexed_tfds_dir(tmp_path_factory):
    """data_dir holding `jaxvae_test_indexed`: train images 0..39, test 100..112 (pixel = id)."""
    tfds = tf_support.import_tfds()

    class JaxvaeTestIndexed(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            image = tfds.features.Image(shape=(4, 4, 1))
            features = tfds.features.FeaturesDict({"image": image})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(0, 40),
                "test": self._generate_examples(100, 113),
            }

        def _generate_examples(self, start, stop):
            for i in range(start, stop):
                yield i, {"image": np.full((4, 4, 1), i, np.uint8)}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    JaxvaeTestIndexed(data_dir=data_dir).download_and_prepare()
    return data_dir


def _indexed_cfg(data_dir, **kw):
    return data_config(
        **{"name": "jaxvae_test_indexed", "data_dir": data_dir, "binarize": "none", **kw}
    )


def test_prepared_dataset_is_used_without_network(indexed_tfds_dir, monkeypatch):
    requested = no_network(monkeypatch, "a prepared dataset must not touch the network")
    for in_memory in (True, False):
        info = input_pipeline.get_dataset_info(_indexed_cfg(indexed_tfds_dir, in_memory=in_memory))
        assert info == input_pipeline.DatasetInfo((4, 4, 1), 40, 13, "jaxvae_test_indexed")
    it = input_pipeline.create_train_iterator(_indexed_cfg(indexed_tfds_dir), 40, 0, 0, 1)
    np.testing.assert_array_equal(np.sort(decode_index(next(it)["image"])), np.arange(40))
    assert requested == []


def test_streaming_process_shards_are_disjoint_and_cover(indexed_tfds_dir):
    pc, shards = 3, []
    for pi in range(pc):
        cfg = _indexed_cfg(indexed_tfds_dir, in_memory=False, shuffle_buffer=64)
        it = input_pipeline.create_train_iterator(
            cfg, pc, seed=1, process_index=pi, process_count=pc
        )
        stream = np.concatenate([decode_index(next(it)["image"]) for _ in range(28)])
        size = len(set(stream.tolist()))
        first, second = stream[:size], stream[size : 2 * size]  # two epochs of this shard
        np.testing.assert_array_equal(np.sort(first), np.sort(second))
        assert len(first) == len(set(first.tolist()))
        shards.append(set(first.tolist()))
    assert sorted(len(s) for s in shards) == [13, 13, 14]
    assert set.union(*shards) == set(range(40))


def test_streaming_resume_on_a_prepared_dataset(indexed_tfds_dir):
    cfg = _indexed_cfg(indexed_tfds_dir, in_memory=False, shuffle_buffer=16, binarize="dynamic")
    it = input_pipeline.create_train_iterator(cfg, 6, seed=2, process_index=0, process_count=1)
    [next(it) for _ in range(8)]  # past the first epoch (40 / 6)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it)["image"] for _ in range(5)]
    it2 = input_pipeline.create_train_iterator(cfg, 6, seed=2, process_index=0, process_count=1)
    it2.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(e, next(it2)["image"])
    assert set(np.unique(np.stack(expected)).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("in_memory", [True, False])
def test_eval_on_a_prepared_dataset_covers_each_process_share(indexed_tfds_dir, in_memory):
    pc, seen, counts = 3, [], set()
    for pi in range(pc):
        cfg = _indexed_cfg(indexed_tfds_dir, in_memory=in_memory)
        batches = list(
            input_pipeline.create_eval_batches(cfg, 6, process_index=pi, process_count=pc)
        )
        counts.add(len(batches))
        for b in batches:
            assert b["image"].shape == (2, 4, 4, 1)
            seen.extend(decode_index(b["image"][b["mask"]]).tolist())
    assert len(counts) == 1  # every process runs the same number of eval steps
    assert sorted(seen) == list(range(100, 113))


# --- offline preparation and its errors ---------------------------------------------------


def write_idx_gz(path, kind: str, count: int, side: int = 28, magic=None, extra: int = 0):
    """Writes a synthetic MNIST-format IDX .gz file."""
    if kind == "images":
        header = struct.pack(">IIII", magic or 2051, count, side, side)
        body = np.random.default_rng(count).integers(0, 256, count * side * side + extra)
        body = body.astype(np.uint8).tobytes()
    else:
        header = struct.pack(">II", magic or 2049, count)
        body = bytes(count + extra)
    with gzip.open(path, "wb") as f:
        f.write(header + body)


def test_idx_validator(tmp_path):
    ok = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx_gz(ok, "images", 100)
    assert prepare.validate_idx_gz(str(ok), "images", 100) == 100
    labels = tmp_path / "labels.gz"
    write_idx_gz(labels, "labels", 20)
    assert prepare.validate_idx_gz(str(labels), "labels") == 20
    cases = {
        "wrong_count": (
            lambda p: write_idx_gz(p, "images", 100),
            "holds 100 items, expected 60000",
        ),
        "magic": (lambda p: write_idx_gz(p, "images", 5, magic=2049), "magic number 2049"),
        "side": (lambda p: write_idx_gz(p, "images", 5, side=32), "32x32"),
        "length": (lambda p: write_idx_gz(p, "images", 5, extra=3), "3923 data bytes"),
        "not_gzip": (lambda p: p.write_bytes(b"\x00\x00\x08\x03 plain"), "does not decompress"),
    }
    for name, (write, message) in cases.items():
        path = tmp_path / f"{name}.gz"
        write(path)
        expected_count = 60000 if name == "wrong_count" else None
        with pytest.raises(input_pipeline.CorruptDatasetFileError, match=message) as e:
            prepare.validate_idx_gz(str(path), "images", expected_count)
        assert str(path) in str(e.value)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    with pytest.raises(input_pipeline.CorruptDatasetFileError, match=str(truncated)):
        prepare.validate_idx_gz(str(truncated), "images")


def test_missing_manual_files_error_lists_them(tmp_path):
    manual = tmp_path / "mnist_files"
    manual.mkdir()
    for name in MNIST_FILES[:2]:
        (manual / name).write_bytes(b"x")
    cfg = data_config(name="mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        input_pipeline.get_dataset_info(cfg)
    msg = str(e.value)
    for name in MNIST_FILES[2:]:
        assert str(manual / name) in msg
    for name in MNIST_FILES[:2]:
        assert str(manual / name) not in msg  # present files are not listed as missing
    assert f"--config.data.manual_dir={manual}" in msg
    assert "lacks 2 of its 4" in msg
    assert not (tmp_path / "tfds" / "mnist").exists()  # nothing was prepared


def test_offline_without_manual_dir_says_what_to_do(tmp_path, monkeypatch):
    import urllib.parse

    requested = no_network(monkeypatch, "no network here")
    cfg = data_config(name="fashion_mnist", data_dir=str(tmp_path))
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        input_pipeline.create_train_iterator(cfg, 8, seed=0, process_index=0, process_count=1)
    msg = str(e.value)
    hosts = {urllib.parse.urlparse(url).hostname for url in requested}
    assert hosts == {"fashion-mnist.s3-website.eu-central-1.amazonaws.com"}
    assert "unreachable" in msg and "--config.data.manual_dir=/path/to/fashion_mnist" in msg
    for name in MNIST_FILES:
        assert f"/path/to/fashion_mnist/{name}" in msg
    assert issubclass(input_pipeline.DatasetNotFoundError, RuntimeError)


def test_no_download_when_the_caller_forbids_it(tmp_path, monkeypatch):
    """``download=False`` (drawing samples, loading a trained model): a dataset that is not
    prepared is not downloaded (no request at all) but reported as missing, with what to do;
    a ``manual_dir`` is still read (here: synthetic files, refused for their item counts)."""
    requested = no_network(monkeypatch, "no network here")
    cfg = data_config(name="fashion_mnist", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        input_pipeline.get_dataset_info(cfg, download=False)
    assert requested == []
    assert "never downloads it" in str(e.value)
    assert "--config.data.manual_dir=/path/to/fashion_mnist" in str(e.value)
    manual = tmp_path / "m"
    manual.mkdir()
    for name in MNIST_FILES:
        kind = "images" if "images" in name else "labels"
        write_idx_gz(manual / name, kind, 100 if name.startswith("train") else 20)
    cfg.manual_dir = str(manual)
    with pytest.raises(input_pipeline.CorruptDatasetFileError, match="expected 10000"):
        input_pipeline.get_dataset_info(cfg, download=False)
    assert requested == []


def test_catalog_image_shape_needs_no_data(tmp_path, monkeypatch):
    """The image shape from tfds's description of a dataset alone (sampling a trained model
    where its data are not): no request, nothing written, the config's crop and resize
    applied, and a crop that does not fit refused as in training."""
    requested = no_network(monkeypatch, "no network here")
    data_dir = tmp_path / "tfds"
    shape = input_pipeline.catalog_image_shape
    assert shape(data_config(name="mnist", data_dir=str(data_dir))) == (28, 28, 1)
    assert shape(data_config(name="cifar10", data_dir=str(data_dir))) == (32, 32, 3)
    celeba = data_config(name="celeb_a", data_dir=str(data_dir), center_crop=148, image_size=64)
    assert shape(celeba) == (64, 64, 3)
    with pytest.raises(tf_support.DataConfigError, match="center_crop=40"):
        shape(data_config(name="mnist", data_dir=str(data_dir), center_crop=40))
    assert requested == [] and not data_dir.exists()


def test_manual_dir_with_corrupt_file_names_it(tmp_path):
    manual = tmp_path / "m"
    manual.mkdir()
    for name in MNIST_FILES:  # right names, synthetic content (100 train / 20 test items)
        kind = "images" if "images" in name else "labels"
        write_idx_gz(manual / name, kind, 100 if name.startswith("train") else 20)
    cfg = data_config(name="mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    with pytest.raises(input_pipeline.CorruptDatasetFileError) as e:
        input_pipeline.get_dataset_info(cfg)
    assert str(manual / "t10k-images-idx3-ubyte.gz") in str(e.value)
    assert "holds 20 items, expected 10000" in str(e.value)


def _amat_manual_dir(path, counts, real_url_infos):
    """Synthetic binarized-MNIST .amat files and their (size, sha256) under the real URLs."""
    import hashlib

    from tensorflow_datasets.core import utils as tfds_utils
    from tensorflow_datasets.core.download import checksums

    path.mkdir()
    url_infos = {}
    for seed, (split, count) in enumerate(counts.items()):
        bits = np.random.default_rng(seed).integers(0, 2, (count, 784))
        data = "".join(" ".join(map(str, row)) + "\n" for row in bits).encode()
        name = f"binarized_mnist_{split}.amat"
        (path / name).write_bytes(data)
        (url,) = [u for u, i in real_url_infos.items() if i.filename == name]
        url_infos[url] = checksums.UrlInfo(
            size=tfds_utils.Size(len(data)),
            checksum=hashlib.sha256(data).hexdigest(),
            filename=name,
        )
    return url_infos


def test_offline_preparation_from_manual_dir_and_checksum_errors(tmp_path, monkeypatch, capsys):
    """Full tfds path with no network: registered checksums replaced by the synthetic files'.
    What it prints says so: tfds's "Downloading and preparing dataset" notes are replaced."""
    no_network(monkeypatch, "preparing from manual_dir must not download")
    builder_cls = type(tf_support.import_tfds().builder("binarized_mnist", data_dir=str(tmp_path)))
    counts = {"train": 12, "valid": 5, "test": 7}
    url_infos = _amat_manual_dir(tmp_path / "m", counts, builder_cls.url_infos)
    # One registered checksum differs from its file: tfds's SHA-256 check must catch it.
    bad = {u: dataclasses.replace(i, checksum="0" * 64) for u, i in url_infos.items()}
    bad = {u: (bad[u] if "valid" in u else i) for u, i in url_infos.items()}
    monkeypatch.setattr(builder_cls, "url_infos", bad)
    cfg = data_config(
        name="binarized_mnist",
        data_dir=str(tmp_path / "d1"),
        manual_dir=str(tmp_path / "m"),
        binarize="none",
    )
    with pytest.raises(input_pipeline.CorruptDatasetFileError, match="SHA-256") as e:
        input_pipeline.get_dataset_info(cfg)
    assert "binarized_mnist_valid.amat" in str(e.value)
    assert not (tmp_path / "d1").exists()  # made for the preparation: removed with its content
    # A data_dir that was there before keeps what it held; only the empty folders tfds made go.
    kept = tmp_path / "d0" / "downloads" / "extracted" / "another_dataset.bin"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"cached")
    cfg["data_dir"] = str(tmp_path / "d0")
    with pytest.raises(input_pipeline.CorruptDatasetFileError, match="SHA-256"):
        input_pipeline.get_dataset_info(cfg)
    assert kept.read_bytes() == b"cached"
    assert not (tmp_path / "d0" / "binarized_mnist").exists()
    # Matching checksums: prepared from manual_dir, offline, and read back exactly.
    monkeypatch.setattr(builder_cls, "url_infos", url_infos)
    cfg["data_dir"] = str(tmp_path / "d2")
    capsys.readouterr()
    info = input_pipeline.get_dataset_info(cfg)
    assert (info.num_train, info.num_eval, info.image_shape) == (12, 7, (28, 28, 1))
    out = capsys.readouterr().out
    prepared = tmp_path / "d2" / "binarized_mnist" / "1.0.0"
    assert out.startswith(f"Preparing binarized_mnist in {prepared} from the files in ") and (
        out.endswith("Prepared binarized_mnist.\n") and "ownload" not in out
    ), out
    x = next(input_pipeline.create_eval_batches(cfg, 8, process_index=0, process_count=1))
    want = np.random.default_rng(2).integers(0, 2, (7, 784))  # the test file's rows
    rows = lambda a: sorted(map(tuple, a.reshape(len(a), 784).astype(int).tolist()))
    assert rows(x["image"][:7]) == rows(want)  # tfds stores examples in its own order
    assert x["mask"].tolist() == [True] * 7 + [False]


@pytest.mark.parametrize(
    "name, words",
    [
        ("mnistt", ["Dataset mnistt not found", "Did you mean 'mnist'"]),
        ("mnist:9.9.9", ["cannot be loaded at version 9.9.9, only: 3.0.1"]),
        ("mnist/nope", ["BuilderConfig nope not found"]),
    ],
)
def test_a_name_tfds_cannot_build_is_one_line(name, words):
    """tfds's own messages list its whole catalog (hundreds of lines): the user sees one."""
    with pytest.raises(tf_support.DataConfigError) as e:
        input_pipeline.get_dataset_info(data_config(name=name))
    message = str(e.value)
    assert message.startswith(f"config.data.name={name!r} cannot be loaded") and "\n" not in message
    for w in words:
        assert w in message


def test_a_data_dir_that_cannot_hold_the_dataset(tmp_path):
    """Refused when the dataset would be prepared there; when it would not be (no download,
    no manual_dir: sampling), it is only missing, so sampling goes on with prior samples."""
    (tmp_path / "file").write_text("")
    cfg = data_config(data_dir=str(tmp_path / "file"))
    with pytest.raises(tf_support.DataConfigError, match="is a file, not a folder"):
        input_pipeline.get_dataset_info(cfg)
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="never downloads it"):
        input_pipeline.get_dataset_info(cfg, download=False)
    cfg.manual_dir = str(tmp_path)  # with files to prepare from, it would write there
    with pytest.raises(tf_support.DataConfigError, match="is a file, not a folder"):
        input_pipeline.get_dataset_info(cfg, download=False)


@pytest.mark.skipif(not REAL_MNIST_DIR.is_dir(), reason=f"no real MNIST files in {REAL_MNIST_DIR}")
def test_real_mnist_files_pass_validation():
    builder = tf_support.import_tfds().builder("mnist")
    assert [filename for filename, _ in prepare.source_files(builder)] == MNIST_FILES
    prepare.check_manual_dir(builder, str(REAL_MNIST_DIR))


@pytest.mark.skipif(
    not REAL_MNIST_DIR.is_dir() or os.environ.get("JAXVAE_TEST_REAL_DATA") != "1",
    reason="prepares real MNIST with tfds (~30 s): set JAXVAE_TEST_REAL_DATA=1 and provide "
    f"the files in {REAL_MNIST_DIR} (or $JAXVAE_MNIST_DIR)",
)
def test_real_mnist_prepares_offline(tmp_path, monkeypatch):
    no_network(monkeypatch, "the network must not be needed with manual_dir")
    cfg = data_config(name="mnist", data_dir=str(tmp_path), manual_dir=str(REAL_MNIST_DIR))
    info = input_pipeline.get_dataset_info(cfg)
    assert info == input_pipeline.DatasetInfo((28, 28, 1), 60000, 10000, "mnist")
    # Second time: already prepared, manual_dir not even needed.
    cfg2 = data_config(name="mnist", data_dir=str(tmp_path), binarize="none")
    batches = list(input_pipeline.create_eval_batches(cfg2, 1000, process_index=0, process_count=1))
    x = np.concatenate([b["image"] for b in batches])
    assert x.shape == (10000, 28, 28, 1) and all(b["mask"].all() for b in batches)
    assert abs(x.mean() - 0.1325) < 0.002  # MNIST test-set mean grey level
