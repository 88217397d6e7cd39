"""Streaming tf.data pipeline for datasets too large for memory (CelebA).

Each process reads its own disjoint part of the split (`tfds.split_for_jax_process`),
shuffles it with a seeded buffer, decodes and center-crops/resizes (PyTorch-VAE's CelebA
transform), and batches; binarization and scaling happen in NumPy with the same code as the
in-memory path.

Resume trade-off: the state is (seed, batches consumed), and a restored iterator rebuilds the
seeded pipeline and skips the consumed examples *before* decoding. Exact (same batches) and
tiny to checkpoint, but resuming costs re-reading the consumed records (no JPEG decoding):
for CelebA about a second or two per epoch already trained. The alternative, checkpointing
tf.data's iterator, would store the whole shuffle buffer (thousands of images) in every
checkpoint and tie checkpoints to TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxvae.data import tf_support, transforms
from jaxvae.data.memory import check_sharding

STATE_KIND = "streaming"


def split_num_examples(builder: Any, split: str) -> int:
    """Number of examples of `split` (from the dataset info, else the tf.data cardinality)."""
    try:
        n = int(builder.info.splits[split].num_examples)
        if n > 0:
            return n
    except (KeyError, ValueError, TypeError):
        pass
    n = int(builder.as_dataset(split=split).cardinality())
    if n < 0:
        raise ValueError(f"{builder.name}: the size of split {split!r} is unknown")
    return n


def _decoded_images(
    builder: Any, split: str, center_crop: int | None, image_size: int | None, **as_dataset_kw
) -> Any:
    """(raw-bytes dataset, decode fn): decoding is a separate map so skips stay cheap."""
    tfds = tf_support.import_tfds()
    tf = tf_support.import_tf()
    native = tuple(builder.info.features["image"].shape)
    ds = builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}, **as_dataset_kw
    )
    ds = ds.map(lambda ex: ex["image"])

    def decode(encoded: Any) -> Any:
        image = tf.io.decode_image(encoded, channels=native[-1], expand_animations=False)
        image.set_shape(native)
        return tf_support.crop_resize(image, center_crop, image_size)

    return ds, decode


class StreamingTrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless shuffled training batches {"image": float32 [L, H, W, C]} read with tf.data."""

    def __init__(
        self,
        builder: Any,
        split: str,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle_buffer: int = 10_000,
        center_crop: int | None = None,
        image_size: int | None = None,
        binarize: str = "none",
        pixel_range: str = "symmetric",
        max_value: int = 255,
    ):
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        if shuffle_buffer < 1:
            raise ValueError(f"config.data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        transforms.check_options(binarize, pixel_range)
        self._local = check_sharding(global_batch_size, process_index, process_count)
        self._builder, self._split = builder, split
        self._global, self._pi, self._pc = global_batch_size, process_index, process_count
        self._buffer, self._crop, self._size = shuffle_buffer, center_crop, image_size
        self._binarize, self._pixel_range, self._max = binarize, pixel_range, max_value
        self._seed = int(seed)
        self._consumed = 0
        self._it = None  # built lazily, so set_state right after creation builds once

    @property
    def local_batch_size(self) -> int:
        return self._local

    def _build(self) -> Iterator[np.ndarray]:
        tfds = tf_support.import_tfds()
        tf = tf_support.import_tf()
        split = tfds.split_for_jax_process(
            self._split, process_index=self._pi, process_count=self._pc
        )
        read_config = tfds.ReadConfig(shuffle_seed=self._seed)
        ds, decode = _decoded_images(
            self._builder,
            split,
            self._crop,
            self._size,
            shuffle_files=True,
            read_config=read_config,
        )
        ds = ds.shuffle(self._buffer, seed=self._seed, reshuffle_each_iteration=True).repeat()
        ds = ds.skip(self._consumed * self._local)  # before decoding: resuming stays cheap
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self._local, drop_remainder=True).prefetch(2)
        return iter(tfds.as_numpy(ds))

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._build()
        images = next(self._it)
        rng = None
        if self._binarize == "dynamic":
            rng = transforms.make_rng(
                transforms.TAG_BINARIZE_TRAIN, self._seed, self._consumed, self._pi
            )
        self._consumed += 1
        return {
            "image": transforms.to_float(images, self._binarize, self._pixel_range, rng, self._max)
        }

    def get_state(self) -> dict[str, int | str]:
        """JSON-serialisable position: {"kind", "seed", "batches_consumed", layout ints}."""
        return {
            "kind": STATE_KIND,
            "seed": self._seed,
            "batches_consumed": self._consumed,
            "global_batch_size": self._global,
            "process_count": self._pc,
        }

    def set_state(self, state: dict) -> None:
        """Restores a position saved by `get_state`; the pipeline is rebuilt on the next batch."""
        expected = self.get_state()
        for key in ("kind", "global_batch_size", "process_count"):
            if state.get(key) != expected[key]:
                raise ValueError(
                    f"cannot resume: the saved iterator state has {key}={state.get(key)!r} but "
                    f"this iterator has {key}={expected[key]!r}."
                )
        consumed = int(state["batches_consumed"])
        if consumed < 0:
            raise ValueError(f"invalid iterator position batches_consumed={consumed}")
        self._seed, self._consumed, self._it = int(state["seed"]), consumed, None


def eval_batches(
    builder: Any,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    center_crop: int | None = None,
    image_size: int | None = None,
    binarize: str = "none",
    pixel_range: str = "symmetric",
    max_value: int = 255,
) -> Iterator[dict[str, np.ndarray]]:
    """The whole split once, in order: {"image": float32 [L, ...], "mask": bool [L]}.

    Process p reads examples [p*N//P, (p+1)*N//P); every process yields the same number of
    batches (padding rows are zeros with mask False).
    """
    tfds = tf_support.import_tfds()
    tf = tf_support.import_tf()
    transforms.check_options(binarize, pixel_range)
    local = check_sharding(batch_size, process_index, process_count)
    n = split_num_examples(builder, split)
    start, stop = process_index * n // process_count, (process_index + 1) * n // process_count
    per_process = -(-n // process_count)  # ceil: the largest process share
    num_batches = -(-per_process // local)
    sub = split if process_count == 1 else f"{split}[{start}:{stop}]"
    ds, decode = _decoded_images(builder, sub, center_crop, image_size, shuffle_files=False)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(local)
    shape = tf_support.output_image_shape(
        tuple(builder.info.features["image"].shape), center_crop, image_size
    )
    it = iter(tfds.as_numpy(ds))
    for b in range(num_batches):
        images = next(it, None)
        out = np.zeros((local, *shape), np.float32)
        mask = np.zeros((local,), bool)
        if images is not None:
            count = len(images)
            rng = None
            if binarize == "dynamic":  # fixed seed keyed by the global position
                rng = transforms.make_rng(
                    transforms.TAG_BINARIZE_EVAL, transforms.EVAL_BINARIZE_SEED, start + b * local
                )
            out[:count] = transforms.to_float(images, binarize, pixel_range, rng, max_value)
            mask[:count] = True
        yield {"image": out, "mask": mask}
