"""uint8 images -> float32 model inputs (NumPy): dynamic binarization and pixel scaling.

Randomness never lives in a hidden stateful RNG: every draw comes from a fresh
`np.random.Generator` seeded from integers that are part of the iterator's state (or
constants for evaluation), so a restored iterator draws exactly the same bits.
"""

from __future__ import annotations

import numpy as np

BINARIZE_OPTIONS = ("dynamic", "none")
PIXEL_RANGES = ("unit", "symmetric")

# Stream tags keep the seed streams of different uses apart.
TAG_SHUFFLE = 0x5EED_0001
TAG_BINARIZE_TRAIN = 0x5EED_0002
TAG_BINARIZE_EVAL = 0x5EED_0003
EVAL_BINARIZE_SEED = 0  # fixed: every evaluation sees the same binarized test set


def make_rng(*words: int) -> np.random.Generator:
    """A Generator determined by non-negative integers (seed, epoch, position, ...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def check_options(binarize: str, pixel_range: str) -> None:
    """ValueError for unknown `binarize` / `pixel_range` values."""
    if binarize not in BINARIZE_OPTIONS:
        raise ValueError(
            f"config.data.binarize={binarize!r} is not one of {BINARIZE_OPTIONS}: "
            "'dynamic' draws x ~ Bernoulli(pixel / max) per batch, 'none' keeps grey levels."
        )
    if pixel_range not in PIXEL_RANGES:
        raise ValueError(
            f"config.data.pixel_range={pixel_range!r} is not one of {PIXEL_RANGES}: "
            "'unit' scales to [0, 1], 'symmetric' to [-1, 1]."
        )


def binarize(images: np.ndarray, rng: np.random.Generator, max_value: int = 255) -> np.ndarray:
    """Dynamic binarization: x ~ Bernoulli(pixel / max_value), independently per pixel.

    Exact in integers: with u uniform on {0, ..., max_value - 1}, P(u < pixel) = pixel / max_value
    (no float rounding; uint8 draws are also the cheapest).

    Args:
      images: uint8 [..., H, W, C] with values in [0, max_value].
      rng: the Generator to draw from (seeded from the iterator state).
    Returns:
      float32 [..., H, W, C] in {0, 1}.
    """
    if not 1 <= max_value <= 255:
        raise ValueError(f"max_value must lie in [1, 255], got {max_value}")
    u = rng.integers(0, max_value, images.shape, dtype=np.uint8)
    return (u < images).astype(np.float32)


def scale(images: np.ndarray, pixel_range: str, max_value: int = 255) -> np.ndarray:
    """uint8 [...] in [0, max_value] -> float32 in [0, 1] ('unit') or [-1, 1] ('symmetric')."""
    x = images.astype(np.float32) * np.float32(1.0 / max_value)
    if pixel_range == "symmetric":
        x = x * np.float32(2.0) - np.float32(1.0)
    return x


def to_float(
    images: np.ndarray,
    binarize_mode: str,
    pixel_range: str,
    rng: np.random.Generator | None,
    max_value: int = 255,
) -> np.ndarray:
    """Model input from uint8 images: binarized {0,1} ('dynamic'; pixel_range ignored) or scaled."""
    if binarize_mode == "dynamic":
        if rng is None:
            raise ValueError("dynamic binarization needs an explicit rng")
        return binarize(images, rng, max_value)
    return scale(images, pixel_range, max_value)
