"""Deterministic, resumable streams of augmented training batches, and validation iteration.

A ``TrainStream`` is an infinite iterator over one split (labeled, or unlabeled). Everything
random is a pure function of its inputs, never of process or worker state:

- the order of epoch ``e`` is a permutation drawn from ``(seed, name, e)``;
- the sample at global position ``g`` of epoch ``e`` is augmented with an RNG drawn from
  ``(seed, name, e, g)``, so batches do not depend on ``num_workers``;
- DDP rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` of the epoch's order,
  padded by wrapping around to a multiple of ``W`` (as ``DistributedSampler``): shards of
  one epoch are disjoint apart from those at most ``W - 1`` wrapped repeats, and together
  cover the split;
- batches run on across epoch boundaries (a labeled set smaller than a batch still works),
  so the state is just ``(epoch, position in this rank's shard)`` of the next sample.

The DataLoader's sampler runs on from epoch to epoch, so its persistent workers are never
stopped and restarted at an epoch boundary (no start-up stall per epoch); the loader is only
rebuilt by ``load_state_dict`` or after an error. ``state_dict`` counts only batches already
returned; ``load_state_dict`` discards whatever the workers had prefetched and restarts from
that state, so a resumed run gets exactly the batches an uninterrupted one would.

Worker errors come back as a value, not an exception, so the trainer sees the original
one-line ``DataError`` ("<file>: cannot decode image ...") rather than a wrapped traceback.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .datasets import DatasetInfo, Splits
from .io import read_pair
# The order, sharding and per-sample RNG of a stream live in stream_order.py, shared with
# the DALI streams (dali.py) without an import circle; re-exported here for existing imports.
from .stream_order import (KeySampler, StreamPosition, epoch_permutation,  # noqa: F401
                           sample_rng, shard_positions)
from .transforms import train_transform, val_transform


class _Failure:
    """A per-sample error carried back from a worker as a value."""

    def __init__(self, message: str):
        self.message = message


def _load_error(sample, e: Exception) -> _Failure:
    if isinstance(e, DataError):
        return _Failure(str(e))
    return _Failure(f"{sample.image}: {type(e).__name__}: {e}")


class _TrainDataset(Dataset):
    """Maps a key ``(epoch, global_position)`` to one augmented sample."""

    def __init__(self, samples, info: DatasetInfo, cfg: DataConfig, seed: int, name: str,
                 with_labels: bool):
        self.samples, self.info, self.cfg = list(samples), info, cfg
        self.seed, self.name, self.with_labels = seed, name, with_labels
        self._perm_epoch, self._perm = None, None  # per-process cache of one epoch's order

    def __len__(self):
        return len(self.samples)

    def index_of(self, epoch: int, position: int) -> int:
        if self._perm_epoch != epoch:
            self._perm = epoch_permutation(len(self.samples), self.seed, self.name, epoch)
            self._perm_epoch = epoch
        return int(self._perm[position % len(self.samples)])  # % wraps the DDP padding

    def __getitem__(self, key):
        epoch, position = key
        s = self.samples[self.index_of(epoch, position)]
        try:
            image, label = read_pair(s.image, s.label if self.with_labels else None,
                                     self.info.label_lut, self.info.num_classes,
                                     self.info.ignore_index)
            rng = sample_rng(self.seed, self.name, epoch, position)
            img, lab = train_transform(image, label, rng, self.cfg)
        except Exception as e:  # noqa: BLE001 - carried back as a one-line DataError
            return _load_error(s, e)
        return (img, lab) if self.with_labels else (img,)


def _collate(items):
    for it in items:
        if isinstance(it, _Failure):
            return {"error": it.message}
    out = {"image": torch.stack([it[0] for it in items])}
    if len(items[0]) > 1:
        out["label"] = torch.stack([it[1] for it in items])
    return out


def _worker_init(_):
    # Each worker decodes and augments one sample at a time; torch's intra-op threads would
    # only oversubscribe the cores the other workers use.
    torch.set_num_threads(1)


class TrainStream(StreamPosition):
    """An infinite, deterministic, resumable iterator of augmented batches of one split."""

    def __init__(self, samples, info: DatasetInfo, cfg: DataConfig, batch_size: int, seed: int,
                 name: str, with_labels: bool = True, rank: int = 0, world_size: int = 1):
        if not samples:
            raise DataError(f"{name}: no samples to stream")
        if batch_size < 1:
            raise ConfigError(f"data: {name} batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.name, self.batch_size, self.num_workers = name, batch_size, cfg.num_workers
        self.with_labels = with_labels
        self._dataset = _TrainDataset(samples, info, cfg, seed, name, with_labels)
        self._sampler = KeySampler(len(samples), batch_size, rank, world_size)
        self._shard_len = len(self._sampler.positions)
        self._epoch, self._pos = 0, 0
        self._it = None
        self._loader = None

    # ---------------------------------------------------------------- iteration
    def _start(self):
        self._sampler.start = (self._epoch, self._pos)
        workers = self.num_workers
        self._loader = DataLoader(
            self._dataset, batch_sampler=self._sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0, worker_init_fn=_worker_init if workers else None,
            prefetch_factor=2 if workers else None)
        self._it = iter(self._loader)

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        batch = next(self._it)
        if "error" in batch:
            msg = batch["error"]
            self.close()  # the prefetch queue is now out of step; a retry restarts cleanly
            raise DataError(msg)
        self._advance()
        return batch

    # ---------------------------------------------------------------- state
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Indices (into the sample list) of this rank's shard of ``epoch``, in order."""
        perm = epoch_permutation(len(self._dataset), self._dataset.seed, self.name, epoch)
        return perm[self._sampler.positions % len(self._dataset)]

    def close(self) -> None:
        it, self._it, self._loader = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def build_train_streams(cfg: DataConfig, splits: Splits, seed: int, method: str,
                        rank: int = 0, world_size: int = 1, device=None) -> dict:
    """Streams for one run: "labeled" always; "unlabeled" for cps and cps-cutmix;
    "unlabeled2" (a second, independent unlabeled stream) for cps-cutmix."""
    if cfg.loader == "dali":
        try:
            from .dali import build_dali_streams
        except ImportError as e:
            raise ConfigError(f"data.loader=dali: NVIDIA DALI is not installed or cannot be "
                              f"imported ({e}); use data.loader=torch") from None
        # device: where the DALI pipeline runs and delivers (the training device).
        return build_dali_streams(cfg, splits, seed, method, rank, world_size, device=device)
    if method not in ("cps", "cps-cutmix", "supervised"):
        raise ConfigError(f"train.method: unknown method {method!r}")
    if not splits.labeled:
        raise DataError(f"{splits.sources.get('labeled', 'labeled split')}: no labeled images")
    streams = {"labeled": TrainStream(splits.labeled, splits.info, cfg, cfg.batch_size, seed,
                                      "labeled", True, rank, world_size)}
    if method in ("cps", "cps-cutmix"):
        if not splits.unlabeled:
            raise DataError(f"{splits.sources.get('unlabeled', 'unlabeled split')}: no unlabeled "
                            f"images (split {cfg.split} leaves none); use train.method=supervised")
        if cfg.unlabeled_batch_size < 1:
            raise ConfigError(f"data.unlabeled_batch_size: must be >= 1 for method {method}")
        names = ["unlabeled"] + (["unlabeled2"] if method == "cps-cutmix" else [])
        for nm in names:
            streams[nm] = TrainStream(splits.unlabeled, splits.info, cfg,
                                      cfg.unlabeled_batch_size, seed, nm, False, rank, world_size)
    return streams


# --------------------------------------------------------------------------- validation


class _ValDataset(Dataset):
    def __init__(self, samples, info: DatasetInfo, cfg: DataConfig):
        self.samples, self.info, self.cfg = samples, info, cfg

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        try:
            image, label = read_pair(s.image, s.label, self.info.label_lut,
                                     self.info.num_classes, self.info.ignore_index)
            img, lab = val_transform(image, label, self.cfg)
        except Exception as e:  # noqa: BLE001
            return _load_error(s, e)
        return img, lab, s.id


def _identity(x):
    return x


def _unwrap_val(item):
    if isinstance(item, _Failure):
        raise DataError(item.message)
    img, lab, sid = item
    return img[None], (lab[None] if lab is not None else None), sid


def iterate_val(samples, info: Optional[DatasetInfo] = None, cfg: Optional[DataConfig] = None,
                max_images: Optional[int] = None, num_workers: Optional[int] = None,
                device=None):
    """Yield ``(image (1,3,H,W) float32, label (1,H,W) int64 or None, sample_id)`` at full
    resolution, in list order. ``samples`` may be a list of Samples or a ``Splits`` (its
    ``val``). ``max_images`` defaults to ``cfg.val_max_images``."""
    if isinstance(samples, Splits):
        info = info or samples.info
        samples = samples.val
    if info is None or cfg is None:
        raise TypeError("iterate_val needs info and cfg")
    if cfg.loader == "dali":
        # Not DataLoader workers forked after DALI's threads started: DALI's own pipeline.
        from .dali import iterate_val_dali
        yield from iterate_val_dali(samples, info, cfg, max_images, device=device)
        return
    limit = max_images if max_images is not None else cfg.val_max_images
    samples = list(samples)[:limit] if limit is not None else list(samples)
    ds = _ValDataset(samples, info, cfg)
    workers = cfg.num_workers if num_workers is None else num_workers
    if workers == 0 or len(samples) <= 1:
        for i in range(len(ds)):
            yield _unwrap_val(ds[i])
        return
    loader = DataLoader(ds, batch_size=None, num_workers=min(workers, len(samples)),
                        collate_fn=_identity, worker_init_fn=_worker_init,
                        pin_memory=torch.cuda.is_available())
    for item in loader:
        yield _unwrap_val(item)
