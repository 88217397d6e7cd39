"""In-memory NumPy batching for small datasets (MNIST family, CIFAR-10).

The whole split is a uint8 array [N, H, W, C]. Training reads an endless stream of seeded
permutations of [0, N), one per epoch, concatenated: batches may straddle epochs, every example
appears once per epoch, nothing is dropped. Global batch g is stream[g*B:(g+1)*B], of which
each process keeps its rows (`BatchSpec`). The state is (seed, epoch, offset) and the layout.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from jaxvae.data import transforms as tr


@functools.lru_cache(maxsize=4)  # the current and next epoch of up to two iterators
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: int64 [num_examples], a function of (seed, epoch) only."""
    order = tr.make_rng(tr.TAG_SHUFFLE, seed, epoch).permutation(num_examples)
    order.flags.writeable = False  # shared by every caller
    return order


class InMemoryTrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless, reshuffled-every-epoch training batches {"image": float32 [L, H, W, C]}.

    `get_state()` / `set_state()` save and restore the position exactly: a restored iterator
    yields the same batches (and the same binarization bits) as the original.
    """

    def __init__(self, images: np.ndarray, seed: int, spec: tr.BatchSpec):
        """`images`: uint8 [N, H, W, C], the whole split (shared, not copied)."""
        if images.ndim != 4 or len(images) == 0 or int(seed) < 0:
            raise ValueError(f"need non-empty images [N, H, W, C] and a seed >= 0: {seed}")
        self._images, self._spec = images, spec
        self._layout = {"num_examples": len(images), **spec.layout}  # a state must match it
        self._seed, self._epoch, self._offset = int(seed), 0, 0  # offset: examples into epoch

    def next_indices(self) -> np.ndarray:
        """This process's example indices of the next global batch ([L] int64); advances."""
        n, chunks, need = len(self._images), [], self._spec.global_batch_size
        while need:  # the global batch may straddle one or more epoch boundaries
            take = min(need, n - self._offset)
            order = epoch_permutation(n, self._seed, self._epoch)
            chunks.append(order[self._offset : self._offset + take])
            need, self._offset = need - take, self._offset + take
            if self._offset == n:
                self._epoch, self._offset = self._epoch + 1, 0
        start = self._spec.process_index * self._spec.local
        return np.concatenate(chunks)[start : start + self._spec.local]

    def __next__(self) -> dict[str, np.ndarray]:
        # Bits keyed by the position before this batch (0: the words of process 0 of old).
        position = (self._seed, self._epoch, self._offset, 0)
        batch = self._images[self.next_indices()]
        return {"image": self._spec.to_float(batch, tr.TAG_BINARIZE_TRAIN, *position, rows=True)}

    def get_state(self) -> dict[str, int | str]:
        """JSON-ready position {"seed", "epoch", "offset"} and the layout it is valid for."""
        position = {"seed": self._seed, "epoch": self._epoch, "offset": self._offset}
        return {"kind": "in_memory", **position, **self._layout}

    def set_state(self, state: dict) -> None:
        """Restores a position saved by `get_state` (of an iterator over the same data/layout)."""
        tr.check_layout(state, {"kind": "in_memory", **self._layout})
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < len(self._images):
            raise ValueError(f"invalid iterator position epoch={epoch}, offset={offset}")
        self._seed, self._epoch, self._offset = int(state["seed"]), epoch, offset


def eval_batches(images: np.ndarray, spec: tr.BatchSpec) -> Iterator[dict[str, np.ndarray]]:
    """The whole split once, in order, as {"image": float32 [L, H, W, C], "mask": bool [L]}.

    Every process yields ceil(N / B) batches; rows past the end of the split are zeros with
    mask False. Binarization draws once over the whole split with a fixed seed, so the bits are
    the same for every evaluation, batch size and process count.
    """
    local, dynamic = spec.local, spec.binarize == "dynamic"
    if dynamic:
        images = spec.to_float(images, tr.TAG_BINARIZE_EVAL, tr.EVAL_BINARIZE_SEED)
    first = spec.process_index * local
    for start in range(first, len(images) + first, spec.global_batch_size):
        rows, out = images[start : start + local], np.zeros((local, *images.shape[1:]), np.float32)
        out[: len(rows)] = rows if dynamic else spec.to_float(rows)
        yield {"image": out, "mask": np.arange(local) < len(rows)}
