"""In-memory NumPy pipeline for small datasets (MNIST family, CIFAR-10).

The whole split is a uint8 array [N, H, W, C]. Training reads an endless stream made of
one seeded permutation of [0, N) per epoch, concatenated: batches may straddle an epoch
boundary, so every example appears exactly once per epoch and nothing is dropped. Global
batch g is stream[g*B:(g+1)*B]; process p keeps rows [p*L, (p+1)*L) of it (L = B / P), so
process shards are disjoint and together cover every global batch. The iterator state is
(seed, epoch, offset) plus the shape it was made for: a few ints, JSON-friendly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jaxvae.data import transforms

STATE_KIND = "in_memory"


def check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validates the process layout; returns the per-process (local) batch size."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})"
        )
    if global_batch_size < 1:
        raise ValueError(f"the global batch size must be positive, got {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count "
            f"{process_count}; choose a batch size that is a multiple of {process_count}."
        )
    return global_batch_size // process_count


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: int64 [num_examples], a function of (seed, epoch) only."""
    return transforms.make_rng(transforms.TAG_SHUFFLE, seed, epoch).permutation(num_examples)


class InMemoryTrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless, reshuffled-every-epoch training batches {"image": float32 [L, H, W, C]}.

    `get_state()` / `set_state()` save and restore the position exactly: a restored
    iterator yields the same batches (and the same binarization bits) as the original.
    """

    def __init__(
        self,
        images: np.ndarray,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        binarize: str = "none",
        pixel_range: str = "unit",
        max_value: int = 255,
    ):
        """Args:
        images: uint8 [N, H, W, C], the whole split (shared, not copied).
        global_batch_size: batch size summed over processes (divisible by process_count).
        seed: non-negative int; determines shuffling and binarization.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
        if len(images) == 0:
            raise ValueError("cannot iterate over an empty split")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        transforms.check_options(binarize, pixel_range)
        self._local = check_sharding(global_batch_size, process_index, process_count)
        self._images = images
        self._global = global_batch_size
        self._pi, self._pc = process_index, process_count
        self._binarize, self._pixel_range, self._max = binarize, pixel_range, max_value
        self._seed = int(seed)
        self._epoch = 0
        self._offset = 0  # position in the epoch's permutation, in examples
        self._perm_epoch, self._perm = -1, None

    @property
    def local_batch_size(self) -> int:
        return self._local

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # memoise the current epoch's order
            self._perm = epoch_permutation(len(self._images), self._seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> np.ndarray:
        """This process's example indices of the next global batch ([L] int64); advances."""
        n = len(self._images)
        epoch, offset = self._epoch, self._offset
        chunks, need = [], self._global
        while need:  # the global batch may straddle one or more epoch boundaries
            take = min(need, n - offset)
            chunks.append(self._permutation(epoch)[offset : offset + take])
            need -= take
            offset += take
            if offset == n:
                epoch, offset = epoch + 1, 0
        global_idx = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        self._epoch, self._offset = epoch, offset
        return global_idx[self._pi * self._local : (self._pi + 1) * self._local]

    def __next__(self) -> dict[str, np.ndarray]:
        # The binarization stream is keyed by the position *before* this batch.
        rng_words = (transforms.TAG_BINARIZE_TRAIN, self._seed, self._epoch, self._offset, self._pi)
        idx = self.next_indices()
        batch = self._images[idx]
        rng = transforms.make_rng(*rng_words) if self._binarize == "dynamic" else None
        return {
            "image": transforms.to_float(batch, self._binarize, self._pixel_range, rng, self._max)
        }

    def get_state(self) -> dict[str, int | str]:
        """JSON-serialisable position: {"kind", "seed", "epoch", "offset", layout ints}."""
        return {
            "kind": STATE_KIND,
            "seed": self._seed,
            "epoch": self._epoch,
            "offset": self._offset,
            "num_examples": len(self._images),
            "global_batch_size": self._global,
            "process_count": self._pc,
        }

    def set_state(self, state: dict) -> None:
        """Restores a position saved by `get_state` (of an iterator over the same data/layout)."""
        expected = self.get_state()
        for key in ("kind", "num_examples", "global_batch_size", "process_count"):
            if key not in state:
                raise ValueError(f"iterator state lacks {key!r}; got keys {sorted(state)}")
            if state[key] != expected[key]:
                raise ValueError(
                    f"cannot resume: the saved iterator state has {key}={state[key]!r} but this "
                    f"iterator has {key}={expected[key]!r} (same dataset, global batch size and "
                    "process count are needed for an exact resume)."
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < len(self._images):
            raise ValueError(f"invalid iterator position epoch={epoch}, offset={offset}")
        self._seed, self._epoch, self._offset = int(state["seed"]), epoch, offset


def eval_batches(
    images: np.ndarray,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    binarize: str = "none",
    pixel_range: str = "unit",
    max_value: int = 255,
) -> Iterator[dict[str, np.ndarray]]:
    """The whole split once, in order, as {"image": float32 [L, H, W, C], "mask": bool [L]}.

    `batch_size` is global (L = batch_size / process_count per process). Every process yields
    the same number of batches, ceil(N / batch_size); the rows past the end of the split are
    zero images with mask False. Binarization uses a fixed seed over the whole split, so the
    data are the same for every evaluation, batch size and process count.
    """
    transforms.check_options(binarize, pixel_range)
    local = check_sharding(batch_size, process_index, process_count)
    n = len(images)
    if binarize == "dynamic":
        rng = transforms.make_rng(transforms.TAG_BINARIZE_EVAL, transforms.EVAL_BINARIZE_SEED)
        data = transforms.binarize(images, rng, max_value)
    else:
        data = None
    num_batches = -(-n // batch_size)
    for b in range(num_batches):
        start = b * batch_size + process_index * local
        stop = min(start + local, n)
        count = max(stop - start, 0)
        out = np.zeros((local, *images.shape[1:]), np.float32)
        if count:
            if data is not None:
                out[:count] = data[start:stop]
            else:
                out[:count] = transforms.scale(images[start:stop], pixel_range, max_value)
        mask = np.zeros((local,), bool)
        mask[:count] = True
        yield {"image": out, "mask": mask}
