"""Input pipeline: tensorflow-datasets as the catalog; NumPy or tf.data for batching.

Images come out as float32 NHWC: in {0, 1} for Bernoulli data (seeded dynamic binarization, or
binarized_mnist's fixed one), in [0, 1] or [-1, 1] otherwise.

  info = get_dataset_info(config.data)
  it = create_train_iterator(config.data, global_batch_size, seed)
  batch = next(it)            # {"image": float32 [global_batch_size / process_count, H, W, C]}
  state = it.get_state()      # a few ints (JSON); it.set_state(state) resumes exactly
  for batch in create_eval_batches(config.data, batch_size): ...   # + "mask": bool [L]

Small datasets (`config.data.in_memory`) are batched in NumPy (`jaxvae.data.memory`), large
ones stream with tf.data (`jaxvae.data.streaming`); preparation and its errors are in
`jaxvae.data.prepare`. `config.data` must hold every field of `config_utils.base_config().data`,
the single place of their defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxvae.data import memory, streaming, tf_support, transforms
from jaxvae.data.prepare import CorruptDatasetFileError, DatasetNotFoundError, prepared_builder
from jaxvae.data.tf_support import DataConfigError

ERRORS = (DatasetNotFoundError, CorruptDatasetFileError, DataConfigError)  # the ones users see

TrainIterator = memory.InMemoryTrainIterator | streaming.StreamingTrainIterator

_MAX_PIXEL_VALUE = {"binarized_mnist": 1}  # largest stored pixel value; others: 255


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Shape and size of a dataset as the pipeline delivers it."""

    image_shape: tuple[int, int, int]  # (H, W, C) after crop/resize
    num_train: int
    num_eval: int
    name: str


def _builder(data: Any, download: bool = True) -> Any:
    """The prepared tfds builder of `config.data` (`--config.data.manual_dir=` means unset)."""
    return prepared_builder(
        data.name, data.data_dir or None, data.manual_dir or None, download=download
    )


def get_dataset_info(data: Any, *, download: bool = True) -> DatasetInfo:
    """Image shape and split sizes from tfds's info (nothing decoded), preparing if needed:
    from `data.manual_dir`, else by downloading (not with ``download=False``).

    DatasetNotFoundError when the dataset is not available (the message says what to do)."""
    builder = _builder(data, download)
    return DatasetInfo(
        tf_support.output_image_shape(builder, data.center_crop, data.image_size),
        tf_support.split_num_examples(builder, data.train_split),
        tf_support.split_num_examples(builder, data.eval_split),
        data.name,
    )


def catalog_image_shape(data: Any) -> tuple[int, int, int]:
    """(H, W, C) of `config.data`'s images after crop/resize, from tensorflow-datasets'
    description of the dataset (its code): nothing is read, prepared or downloaded, so it is
    known where the data are not. ValueError for a dataset whose images vary in size."""
    tfds = tf_support.import_tfds()
    builder = tfds.builder(data.name, data_dir=data.data_dir or None)
    return tf_support.output_image_shape(builder, data.center_crop, data.image_size)


def _prepare(data: Any, batch_size: int, process_index: int | None, process_count: int | None):
    """(BatchSpec, prepared builder); the layout is checked first, so bad sizes fail fast."""
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    max_value = _MAX_PIXEL_VALUE.get(data.name, 255)
    spec = transforms.BatchSpec(batch_size, pi, pc, data.binarize, data.pixel_range, max_value)
    return spec, _builder(data)


def _images(builder: Any, data: Any, split: str, max_value: int) -> np.ndarray:
    """The whole split in memory, its pixel values checked against the dataset's range."""
    images = tf_support.load_split(builder, split, data.center_crop, data.image_size)
    if images.size and int(images.max()) > max_value:  # e.g. a mock without max_value
        raise ValueError(
            f"{data.name} split {split!r} holds pixel values up to {int(images.max())}, but "
            f"{data.name} stores values in [0, {max_value}] (in tests use "
            f"tfds.testing.mock_data(..., max_value={max_value + 1}), an exclusive bound)."
        )
    return images


def create_train_iterator(
    data: Any,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """Endless iterator of this process's share of each global batch: next(it) -> {"image":
    float32 [global_batch_size // process_count, H, W, C]}; process_index/count default to JAX's.

    The seed (>= 0) fixes order and binarization; it.set_state(it.get_state()) resumes exactly.
    """
    spec, builder = _prepare(data, global_batch_size, process_index, process_count)
    if not data.in_memory:
        return streaming.StreamingTrainIterator(builder, data, seed, spec)
    images = _images(builder, data, data.train_split, spec.max_value)
    return memory.InMemoryTrainIterator(images, seed, spec)


def create_eval_batches(
    data: Any,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The whole eval split once, deterministic: {"image": [L, H, W, C], "mask": bool [L]}.

    `batch_size` is global: L = batch_size // process_count rows per process and batch. The
    last batch is padded with zero images whose mask is False; every process yields the same
    number of batches. Binarization uses a fixed seed. The split is read anew at every call.
    """
    spec, builder = _prepare(data, batch_size, process_index, process_count)
    if not data.in_memory:
        return streaming.eval_batches(builder, data, spec)
    return memory.eval_batches(_images(builder, data, data.eval_split, spec.max_value), spec)
