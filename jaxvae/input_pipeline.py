"""Input pipeline: tensorflow-datasets as the catalog; NumPy or tf.data for batching.

Images come out as float32 NHWC: in {0, 1} for Bernoulli data (dynamic binarization with
an explicit seed, or binarized_mnist's fixed binarization), in [0, 1] or [-1, 1] otherwise.

  info = get_dataset_info(config.data)
  it = create_train_iterator(config.data, global_batch_size, seed)
  batch = next(it)            # {"image": float32 [global_batch_size / process_count, H, W, C]}
  state = it.get_state()      # a few ints (JSON); it.set_state(state) resumes exactly
  for batch in create_eval_batches(config.data, batch_size): ...   # + "mask": bool [L]

Small datasets (`config.data.in_memory=True`: MNIST family, CIFAR-10) are read once into a
uint8 array and shuffled/batched in NumPy; large ones stream with tf.data. Offline
preparation from `config.data.manual_dir` and the errors users see are in `jaxvae.data.prepare`.

`config.data` fields: name, data_dir, manual_dir, train_split ("train"), eval_split ("test"),
binarize ("dynamic" | "none"), pixel_range ("unit" | "symmetric"), image_size, center_crop,
in_memory, shuffle_buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxvae.data import memory, prepare, streaming, tf_support, transforms
from jaxvae.data.errors import CorruptDatasetFileError, DatasetNotFoundError

__all__ = [
    "CorruptDatasetFileError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "TrainIterator",
    "create_eval_batches",
    "create_train_iterator",
    "get_dataset_info",
]

TrainIterator = memory.InMemoryTrainIterator | streaming.StreamingTrainIterator

_DEFAULTS: dict[str, Any] = {
    "data_dir": None,
    "manual_dir": None,
    "train_split": "train",
    "eval_split": "test",
    "binarize": "none",
    "pixel_range": "unit",
    "image_size": None,
    "center_crop": None,
    "in_memory": True,
    "shuffle_buffer": 10_000,
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Shape and size of a dataset as the pipeline delivers it."""

    image_shape: tuple[int, int, int]  # (H, W, C) after crop/resize
    num_train: int
    num_eval: int
    name: str


@dataclasses.dataclass(frozen=True)
class _Options:
    name: str
    data_dir: str | None
    manual_dir: str | None
    train_split: str
    eval_split: str
    binarize: str
    pixel_range: str
    image_size: int | None
    center_crop: int | None
    in_memory: bool
    shuffle_buffer: int


def _options(data_config: Any) -> _Options:
    """Reads config.data (ConfigDict, dict or any object with attributes), with defaults."""
    if isinstance(data_config, Mapping) or hasattr(data_config, "get"):
        get = data_config.get
    else:
        get = lambda k, d=None: getattr(data_config, k, d)
    name = get("name", None)
    if not name:
        raise ValueError("config.data.name must name a tensorflow-datasets dataset, e.g. 'mnist'")
    values = {k: get(k, d) for k, d in _DEFAULTS.items()}
    for k in ("data_dir", "manual_dir"):  # `--config.data.manual_dir=` means unset
        values[k] = str(values[k]) if values[k] else None
    for k in ("image_size", "center_crop"):
        if values[k] is not None:
            values[k] = int(values[k])
    opts = _Options(name=str(name), **values)
    transforms.check_options(opts.binarize, opts.pixel_range)
    return opts


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def _builder(opts: _Options) -> Any:
    return prepare.ensure_prepared(opts.name, opts.data_dir, opts.manual_dir)


def _images(builder: Any, opts: _Options, split: str) -> np.ndarray:
    images = prepare.load_split(builder, split, opts.center_crop, opts.image_size)
    max_value = prepare.max_pixel_value(opts.name)
    if max_value < 255 and images.size and int(images.max()) > max_value:
        # e.g. binarized_mnist under tfds.testing.mock_data() without max_value=1
        raise ValueError(
            f"{opts.name} split {split!r} holds pixel values up to {int(images.max())}, but "
            f"{opts.name} stores values in [0, {max_value}]; (in tests use "
            f"tfds.testing.mock_data(..., max_value={max_value + 1}), an exclusive bound)."
        )
    return images


def get_dataset_info(data_config: Any) -> DatasetInfo:
    """Image shape and split sizes, preparing the dataset if needed.

    Sizes are counted from the data actually read (in-memory path) or taken from tfds's
    split info (streaming path).

    Raises:
      DatasetNotFoundError when the dataset is not available (message says what to do).
    """
    opts = _options(data_config)
    builder = _builder(opts)
    if opts.in_memory:
        train = _images(builder, opts, opts.train_split)
        evals = _images(builder, opts, opts.eval_split)
        return DatasetInfo(tuple(train.shape[1:]), len(train), len(evals), opts.name)
    shape = tf_support.output_image_shape(
        prepare.native_image_shape(builder), opts.center_crop, opts.image_size
    )
    return DatasetInfo(
        shape,
        streaming.split_num_examples(builder, opts.train_split),
        streaming.split_num_examples(builder, opts.eval_split),
        opts.name,
    )


def _prepare_for_batches(
    data_config: Any, batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[_Options, Any, dict[str, Any]]:
    """Shared start of the batch factories: options, prepared builder, common iterator kwargs.

    The process layout is checked before any data work, so a bad batch size fails fast.
    """
    opts = _options(data_config)
    pi, pc = _process(process_index, process_count)
    memory.check_sharding(batch_size, pi, pc)
    common = {
        "process_index": pi,
        "process_count": pc,
        "binarize": opts.binarize,
        "pixel_range": opts.pixel_range,
        "max_value": prepare.max_pixel_value(opts.name),
    }
    return opts, _builder(opts), common


def create_train_iterator(
    data_config: Any,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """Endless training iterator of this process's share of each global batch.

    Args:
      data_config: config.data.
      global_batch_size: batch size over all processes; must divide by process_count.
      seed: non-negative int; fixes the shuffling and the binarization bits.
      process_index, process_count: default jax.process_index() / jax.process_count().
    Returns:
      iterator; next(it) -> {"image": float32 [global_batch_size // process_count, H, W, C]};
      it.get_state() -> JSON-serialisable dict; it.set_state(state) resumes exactly.
    Raises:
      ValueError when global_batch_size is not divisible by process_count.
    """
    opts, builder, common = _prepare_for_batches(
        data_config, global_batch_size, process_index, process_count
    )
    if opts.in_memory:
        images = _images(builder, opts, opts.train_split)
        return memory.InMemoryTrainIterator(images, global_batch_size, seed, **common)
    return streaming.StreamingTrainIterator(
        builder,
        opts.train_split,
        global_batch_size,
        seed,
        shuffle_buffer=opts.shuffle_buffer,
        center_crop=opts.center_crop,
        image_size=opts.image_size,
        **common,
    )


def create_eval_batches(
    data_config: Any,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The whole eval split once, deterministic: {"image": [L, H, W, C], "mask": bool [L]}.

    `batch_size` is global like the training batch size: each process gets
    L = batch_size // process_count rows per batch (L = batch_size on one host). The last
    batch is padded with zero images whose mask is False; every process yields the same
    number of batches. Binarization of eval data uses a fixed seed.
    """
    opts, builder, common = _prepare_for_batches(
        data_config, batch_size, process_index, process_count
    )
    if opts.in_memory:
        images = _images(builder, opts, opts.eval_split)
        return memory.eval_batches(images, batch_size, **common)
    return streaming.eval_batches(
        builder,
        opts.eval_split,
        batch_size,
        center_crop=opts.center_crop,
        image_size=opts.image_size,
        **common,
    )
