"""What both batch iterators share (NumPy): the process layout and uint8 -> float32 conversion.

Randomness never lives in a hidden stateful RNG: every draw comes from a fresh Generator seeded
from integers that are part of the iterator's state (or constants for evaluation), so a
restored iterator draws exactly the same bits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BINARIZE_OPTIONS, PIXEL_RANGES = ("dynamic", "none"), ("unit", "symmetric")
# Stream tags keep the seed streams of different uses apart.
TAG_SHUFFLE, TAG_BINARIZE_TRAIN, TAG_BINARIZE_EVAL = 0x5EED_0001, 0x5EED_0002, 0x5EED_0003
EVAL_BINARIZE_SEED = 0  # fixed: every evaluation sees the same binarized test set


def make_rng(*words: int) -> np.random.Generator:
    """A Generator determined by non-negative integers (seed, epoch, position, ...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def binarize(images: np.ndarray, rng: np.random.Generator, max_value=255, shape=None, start=0):
    """x ~ Bernoulli(pixel / max_value): uint8 -> float32 in {0, 1}, exact in integers (P(u <
    pixel) = pixel / max_value for u uniform on {0..max_value-1}). The u are drawn for `shape`
    (default images.shape) and rows [start, start + len(images)) of them are used."""
    u = rng.integers(0, max_value, shape or images.shape, dtype=np.uint8)
    return (u[start : start + len(images)] < images).astype(np.float32)


def scale(images: np.ndarray, pixel_range: str, max_value: int = 255) -> np.ndarray:
    """uint8 [...] in [0, max_value] -> float32 in [0, 1] ('unit') or [-1, 1] ('symmetric')."""
    x = images.astype(np.float32) * np.float32(1.0 / max_value)
    return x * np.float32(2.0) - np.float32(1.0) if pixel_range == "symmetric" else x


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """One process's share of every global batch, and how its uint8 images become float32.

    Process p of P takes rows [p*L, (p+1)*L) of each global batch of B rows (L = B / P).
    """

    global_batch_size: int
    process_index: int = 0
    process_count: int = 1
    binarize: str = "none"  # "dynamic": x ~ Bernoulli(pixel / max_value) | "none": grey levels
    pixel_range: str = "unit"  # "unit": [0, 1] | "symmetric": [-1, 1]
    max_value: int = 255  # largest stored pixel value (binarized_mnist: 1)

    def __post_init__(self) -> None:
        if self.binarize not in BINARIZE_OPTIONS or self.pixel_range not in PIXEL_RANGES:
            raise ValueError(
                f"config.data.binarize={self.binarize!r} must be one of {BINARIZE_OPTIONS} and "
                f"config.data.pixel_range={self.pixel_range!r} one of {PIXEL_RANGES}."
            )
        if not (1 <= self.max_value <= 255 and 0 <= self.process_index < self.process_count):
            raise ValueError(f"invalid batch layout {self}")
        if self.global_batch_size < 1 or self.global_batch_size % self.process_count:
            raise ValueError(
                f"global batch size {self.global_batch_size} is not divisible by the process "
                f"count {self.process_count}; choose a positive multiple of {self.process_count}."
            )

    @property
    def local(self) -> int:
        """Rows per process and batch."""
        return self.global_batch_size // self.process_count

    @property
    def layout(self) -> dict[str, int]:
        """The part of a saved iterator state that must match for an exact resume."""
        return {"global_batch_size": self.global_batch_size, "process_count": self.process_count}

    def to_float(self, images: np.ndarray, *rng_words: int, rows: bool = False) -> np.ndarray:
        """Model input: binarized with make_rng(*rng_words) ('dynamic') or scaled. `rows`: these
        are this process's rows of a global batch, whose bits are drawn whole, then sliced."""
        if self.binarize != "dynamic":
            return scale(images, self.pixel_range, self.max_value)
        full = (self.global_batch_size, *images.shape[1:]) if rows else None
        start = self.process_index * self.local if rows else 0
        return binarize(images, make_rng(*rng_words), self.max_value, full, start)


def check_layout(state: dict, expected: dict) -> None:
    """ValueError unless a saved iterator `state` has every `expected` (layout) value."""
    for key, value in expected.items():
        if state.get(key) != value:
            msg = f"the saved iterator state has {key}={state.get(key)!r}, this iterator {value!r}"
            raise ValueError(f"cannot resume exactly: {msg}.")
