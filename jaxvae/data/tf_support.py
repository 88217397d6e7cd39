"""Guarded TensorFlow import and the TF image ops used by both data paths.

TensorFlow is only the reader here: it must never take an accelerator away from JAX, so the
first import hides every GPU from it (before TF initialises its devices).
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def import_tf() -> Any:
    """Imports TensorFlow with no GPU visible to it; returns the module."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        # Devices were already initialised by someone else (RuntimeError) or there is
        # no GPU device type at all (tensorflow-cpu builds): nothing to hide.
        pass
    return tf


@functools.cache
def import_tfds() -> Any:
    """Imports tensorflow_datasets after hiding GPUs from TensorFlow."""
    import_tf()
    import tensorflow_datasets as tfds

    return tfds


def output_image_shape(
    native_shape: tuple[int, int, int], center_crop: int | None, image_size: int | None
) -> tuple[int, int, int]:
    """(H, W, C) after the optional center crop then resize.

    Raises:
      ValueError when the crop is larger than the image.
    """
    h, w, c = native_shape
    if center_crop is not None:
        if center_crop <= 0 or center_crop > min(h, w):
            raise ValueError(
                f"config.data.center_crop={center_crop} does not fit images of shape "
                f"{native_shape}; use a value in [1, {min(h, w)}] or None."
            )
        h = w = center_crop
    if image_size is not None:
        if image_size <= 0:
            raise ValueError(f"config.data.image_size must be positive or None, got {image_size}")
        h = w = image_size
    return (h, w, c)


def crop_offsets(size: int, crop: int) -> int:
    """Top/left offset of a center crop, rounded as torchvision's CenterCrop does."""
    return int(round((size - crop) / 2.0))


def crop_resize(image: Any, center_crop: int | None, image_size: int | None) -> Any:
    """TF op: uint8 image [H, W, C] -> uint8 [S, S, C] (center crop then bilinear resize).

    Mirrors PyTorch-VAE's CelebA transform (CenterCrop(148), Resize(64) on a PIL image):
    bilinear with antialiasing, rounded back to uint8 like PIL.
    """
    tf = import_tf()
    if center_crop is not None:
        h, w = image.shape[0], image.shape[1]
        if h is None or w is None:  # dynamic shapes: compute offsets in-graph
            shape = tf.shape(image)
            top = tf.cast(tf.round((shape[0] - center_crop) / 2), tf.int32)
            left = tf.cast(tf.round((shape[1] - center_crop) / 2), tf.int32)
        else:
            top, left = crop_offsets(h, center_crop), crop_offsets(w, center_crop)
        image = tf.image.crop_to_bounding_box(image, top, left, center_crop, center_crop)
    if image_size is not None:
        image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return image
