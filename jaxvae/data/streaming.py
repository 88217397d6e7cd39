"""Streaming tf.data batching for datasets too large for memory (CelebA).

Each process reads its own disjoint part of the split (`tfds.split_for_jax_process`), shuffles
it with a seeded buffer, decodes and center-crops/resizes (PyTorch-VAE's CelebA transform) and
batches; binarization and scaling happen in NumPy with the same code as the in-memory path.

Resume: the state is (seed, batches consumed); a restored iterator rebuilds the seeded pipeline
and skips the consumed records before decoding. Exact and tiny, for re-reading those records;
tf.data's own checkpoints would hold the whole shuffle buffer and tie them to TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxvae.data import tf_support
from jaxvae.data import transforms as tr


def _images(builder: Any, split: str, data: Any, seed: int | None = None) -> tuple[Any, Any]:
    """(tf.data of still-encoded images, function mapping such a dataset to decoded uint8 images
    center-cropped/resized); skipping encoded records is cheap. `seed` None: files in order."""
    tfds, tf = tf_support.import_tfds(), tf_support.import_tf()
    native = tuple(builder.info.features["image"].shape)
    ds = builder.as_dataset(
        split=split,
        decoders={"image": tfds.decode.SkipDecoding()},
        shuffle_files=seed is not None,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )

    def decode(image_bytes: Any) -> Any:
        image = tf.io.decode_image(image_bytes, channels=native[-1], expand_animations=False)
        image.set_shape(native)
        return tf_support.crop_resize(image, data.center_crop, data.image_size)

    def decoded(ds: Any) -> Any:
        options = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True}
        return tf_support.map_images(ds, decode, **options)

    return tf_support.map_images(ds, lambda ex: ex["image"]), decoded


class StreamingTrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless shuffled training batches {"image": float32 [L, H, W, C]} read with tf.data."""

    def __init__(self, builder: Any, data: Any, seed: int, spec: tr.BatchSpec):
        """`data`: config.data (train_split, shuffle_buffer >= 1, center_crop, image_size)."""
        self._builder, self._data, self._spec = builder, data, spec
        self._seed, self._consumed = int(seed), 0
        self._it: Iterator[np.ndarray] | None = None  # built lazily: set_state builds once

    def _build(self) -> Iterator[np.ndarray]:
        tfds, spec, seed = tf_support.import_tfds(), self._spec, self._seed
        layout = {"process_index": spec.process_index, "process_count": spec.process_count}
        split = tfds.split_for_jax_process(self._data.train_split, **layout)
        ds, decoded = _images(self._builder, split, self._data, seed)
        ds = ds.shuffle(self._data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = decoded(ds.repeat().skip(self._consumed * spec.local))  # skip first: cheap resume
        return iter(tfds.as_numpy(ds.batch(spec.local, drop_remainder=True).prefetch(2)))

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._build()
        images = next(self._it)
        position = (self._seed, self._consumed, self._spec.process_index)
        self._consumed += 1
        return {"image": self._spec.to_float(images, tr.TAG_BINARIZE_TRAIN, *position)}

    def get_state(self) -> dict[str, int | str]:
        """JSON-ready {"kind", "seed", "batches_consumed", "global_batch_size", "process_count"}."""
        position = {"seed": self._seed, "batches_consumed": self._consumed}
        return {"kind": "streaming", **position, **self._spec.layout}

    def set_state(self, state: dict) -> None:
        """Restores a position saved by `get_state`; the pipeline is rebuilt on the next batch."""
        tr.check_layout(state, {"kind": "streaming", **self._spec.layout})
        self._seed, self._consumed = int(state["seed"]), max(0, int(state["batches_consumed"]))
        self._it = None


def eval_batches(builder: Any, data: Any, spec: tr.BatchSpec) -> Iterator[dict[str, np.ndarray]]:
    """The whole eval split once, in order: {"image": float32 [L, ...], "mask": bool [L]}.

    Process p reads examples [p*N//P, (p+1)*N//P); every process yields the same number of
    batches (padding rows are zeros with mask False). Binarization uses a fixed seed keyed by
    the batch's first example.
    """
    local, p, count = spec.local, spec.process_index, spec.process_count
    n = tf_support.split_num_examples(builder, data.eval_split)
    start, stop = p * n // count, (p + 1) * n // count
    largest_share = -(-n // count)
    num_batches = -(-largest_share // local)
    split = data.eval_split if count == 1 else f"{data.eval_split}[{start}:{stop}]"
    ds, decoded = _images(builder, split, data)
    it = iter(tf_support.import_tfds().as_numpy(decoded(ds).batch(local)))
    shape = tf_support.output_image_shape(builder, data.center_crop, data.image_size)
    for b in range(num_batches):
        out, mask = np.zeros((local, *shape), np.float32), np.zeros(local, bool)
        if (images := next(it, None)) is not None:
            words = (tr.TAG_BINARIZE_EVAL, tr.EVAL_BINARIZE_SEED, start + b * local)
            out[: len(images)], mask[: len(images)] = spec.to_float(images, *words), True
        yield {"image": out, "mask": mask}
