"""The TensorFlow side of reading: guarded import, split sizes and contents, image ops.

TensorFlow is only the reader here: it must never take an accelerator away from JAX, so the
first import hides every GPU from it (before TF initialises its devices).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import numpy as np


@functools.cache
def import_tf() -> Any:
    """Imports TensorFlow with no GPU visible to it; returns the module."""
    import tensorflow as tf

    # RuntimeError: devices already initialised elsewhere; ValueError: no GPU type (TF-CPU).
    with contextlib.suppress(RuntimeError, ValueError):
        tf.config.set_visible_devices([], "GPU")
    return tf


@functools.cache
def import_tfds() -> Any:
    """Imports tensorflow_datasets after hiding GPUs from TensorFlow."""
    import_tf()
    import tensorflow_datasets as tfds

    return tfds


class DataConfigError(ValueError):
    """A `config.data` value this dataset cannot serve (a crop too large, an unknown split)."""


def output_image_shape(builder: Any, crop: int | None, size: int | None) -> tuple[int, int, int]:
    """(H, W, C) of the builder's "image" feature after the optional center crop then resize."""
    native = tuple(builder.info.features["image"].shape)
    if len(native) != 3 or None in native:
        raise ValueError(f"{builder.name}: expected a fixed-size image feature, got {native}")
    if crop is not None and not 0 < crop <= min(native[:2]):
        msg = f"does not fit the {builder.name} images ({native[0]}x{native[1]}); use at most"
        raise DataConfigError(f"config.data.center_crop={crop} {msg} {min(native[:2])} or None.")
    side = size or crop
    return (side, side, native[2]) if side else native


def split_num_examples(builder: Any, split: str) -> int:
    """Size of `split` from the dataset info, else the tf.data cardinality (nothing decoded)."""
    try:  # also sub-splits such as "train[:1000]"
        n = int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
        n = 0
    # Info without split sizes (e.g. a builder's code only): tf.data's cardinality, or < 0.
    try:
        n = n if n > 0 else int(builder.as_dataset(split=split).cardinality())
    except (KeyError, ValueError) as e:
        splits = ", ".join(sorted(builder.info.splits.keys()))
        msg = f"{builder.name} has no split {split!r} (it has: {splits}); fix --config.data"
        raise DataConfigError(f"{msg}.train_split / eval_split.") from e
    if n < 0:
        raise ValueError(f"{builder.name}: the size of split {split!r} is unknown")
    return n


def map_images(ds: Any, fn: Any, **options: Any) -> Any:
    """``ds.map(fn, **options)`` without AutoGraph: jaxvae's map functions are plain TF ops whose
    only Python branches test config values, so the converted graph would be the same. Converting
    costs ~0.2 CPU-s per function and process, and leaves its generated source in the temp
    folder of a process that is killed."""
    return ds.map(import_tf().autograph.experimental.do_not_convert(fn), **options)


def crop_resize(image: Any, center_crop: int | None, image_size: int | None) -> Any:
    """TF op: uint8 image [H, W, C] -> uint8 [S, S, C], center crop then bilinear resize.

    PyTorch-VAE's CelebA transform (PIL CenterCrop(148), Resize(64)): offsets rounded like
    torchvision, antialiased bilinear resize rounded back to uint8 like PIL."""
    tf = import_tf()
    if center_crop is not None:
        shape = tf.shape(image)
        top = tf.cast(tf.round((shape[0] - center_crop) / 2), tf.int32)
        left = tf.cast(tf.round((shape[1] - center_crop) / 2), tf.int32)
        image = tf.image.crop_to_bounding_box(image, top, left, center_crop, center_crop)
    if image_size is not None:
        image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return image


def load_split(builder: Any, split: str, crop: int | None, size: int | None) -> np.ndarray:
    """The whole split in file order as a read-only uint8 array [N, H, W, C] (cropped/resized).

    Read in chunks: tfds's `batch_size=-1` needs split sizes, which some builders' info lacks.
    """
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = map_images(ds, lambda ex: crop_resize(ex["image"], crop, size))
    chunks = list(import_tfds().as_numpy(ds.batch(8192)))
    shape = output_image_shape(builder, crop, size)
    images = np.concatenate(chunks) if chunks else np.zeros((0, *shape), np.uint8)
    images.flags.writeable = False
    return images
