"""The order of a training stream, shared by the PyTorch loader (loader.py) and the DALI
streams (dali.py): both import it from here, so neither imports the other at module level.

Everything is a pure function of its inputs (see loader.py's docstring): the epoch order,
each rank's share of it, the run-on-across-epochs batching of keys ``(epoch, position)``,
the per-sample augmentation RNG, and the ``(epoch, position)`` state both stream kinds keep.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np

from ..errors import DataError

_PERM, _AUG = 0, 1  # purpose tags in the seed sequences, so the streams never collide


def _name_key(name: str) -> int:
    # A stable hash (Python's hash() is salted per process).
    return zlib.crc32(name.encode("utf-8"))


def epoch_permutation(n: int, seed: int, name: str, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch`` of split ``name``: a permutation of ``range(n)``."""
    ss = np.random.SeedSequence([int(seed), _name_key(name), int(epoch), _PERM])
    return np.random.Generator(np.random.PCG64(ss)).permutation(n)


def sample_rng(seed: int, name: str, epoch: int, position: int) -> np.random.Generator:
    """The augmentation RNG of global position ``position`` in epoch ``epoch``."""
    ss = np.random.SeedSequence([int(seed), _name_key(name), int(epoch), _AUG, int(position)])
    return np.random.Generator(np.random.PCG64(ss))


def shard_positions(n: int, rank: int, world_size: int) -> np.ndarray:
    """Global positions (into the padded epoch order) that ``rank`` takes."""
    per_rank = -(-n // world_size)  # ceil
    return rank + world_size * np.arange(per_rank)


class KeySampler:
    """Infinite batch sampler of keys ``(epoch, global_position)`` from a start state."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        self.positions = shard_positions(n, rank, world_size)
        self.batch_size = batch_size
        self.start = (0, 0)

    def __iter__(self) -> Iterator[list]:
        epoch, pos = self.start
        shard = len(self.positions)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                batch.append((epoch, int(self.positions[pos])))
                pos += 1
                if pos == shard:
                    epoch, pos = epoch + 1, 0
            yield batch


class StreamPosition:
    """The state both stream kinds (this PyTorch one and DALI's) share: ``(epoch, position
    in this rank's shard)`` of the next sample, advanced only for batches returned."""

    name: str
    batch_size: int
    _shard_len: int
    _epoch: int = 0
    _pos: int = 0

    def __iter__(self):
        return self

    def _advance(self) -> None:
        self._pos += self.batch_size
        self._epoch += self._pos // self._shard_len
        self._pos %= self._shard_len

    @property
    def epoch(self) -> int:
        """Epochs completed over this rank's shard of the split."""
        return self._epoch

    @property
    def batches_per_epoch(self) -> float:
        return self._shard_len / self.batch_size

    def __len__(self) -> int:
        """Samples in this rank's shard of one epoch."""
        return self._shard_len

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._pos}

    def load_state_dict(self, d: dict) -> None:
        epoch, pos = int(d["epoch"]), int(d["position"])
        if epoch < 0 or not 0 <= pos < self._shard_len:
            raise DataError(f"{self.name} stream: bad state {d} (shard of {self._shard_len})")
        self.close()  # drop whatever was prefetched from the old position
        self._epoch, self._pos = epoch, pos


__all__ = ["KeySampler", "StreamPosition", "epoch_permutation", "sample_rng", "shard_positions"]
