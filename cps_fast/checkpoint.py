"""Checkpoints: atomic writes, the last K kept, the best by mIoU, resume validation.

A checkpoint holds both networks, the optimiser, the step, the RNG states (torch CPU and
CUDA, numpy, Python, the CutMix generator), the data streams' positions, the config and the
best score so far, so that a resumed run continues exactly. Files are written to a temporary
name in the same directory, fsynced, then renamed: a crash mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import CheckpointError

FORMAT_VERSION = 1
# Config keys that must match for a checkpoint to be resumed / loaded into a model.
STRUCTURAL_KEYS = ("train.method", "data.dataset", "data.num_classes", "model.backbone",
                   "model.output_stride", "model.aspp_channels", "model.decoder_channels",
                   "model.low_level_channels")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_link(src: Path, dst: Path, state: dict) -> None:
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        atomic_save(state, dst)


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        # Tensors and plain containers only (what cps_fast writes): loading never runs code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Written before checkpoints held only plain objects (numpy's RNG state was an
        # array): full unpickling, for files this project wrote.
        print(f"notice: checkpoint {path} holds non-tensor objects (an older cps_fast); "
              f"loading it with full unpickling -- only load files you trust", file=sys.stderr)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: unreadable ({type(e).__name__}: {e})")
    except Exception as e:  # truncated / not a torch file
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(e).__name__}: {e})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: not a cps_fast checkpoint "
                              f"(format {ckpt.get('format') if isinstance(ckpt, dict) else '?'})")
    return ckpt


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def check_compatible(ckpt_config: dict, config: dict, path: str | os.PathLike) -> None:
    """Raise CheckpointError naming every structural key that differs."""
    diffs = [f"{k}: checkpoint {_get(ckpt_config, k)!r} vs run {_get(config, k)!r}"
             for k in STRUCTURAL_KEYS if _get(ckpt_config, k) != _get(config, k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from another config: " + "; ".join(diffs))


def rng_state(cutmix_generator: Optional[torch.Generator] = None) -> dict:
    # numpy's state as a tensor + plain values: the checkpoint then holds only what
    # torch.load(weights_only=True) accepts (tensors, containers, numbers, strings).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if cutmix_generator is not None:
        state["cutmix"] = cutmix_generator.get_state()
    return state


def set_rng_state(state: dict, cutmix_generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    if torch.is_tensor(keys):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if cutmix_generator is not None and "cutmix" in state:
        cutmix_generator.set_state(state["cutmix"])


class CheckpointManager:
    """Writes ``last.pt`` every time, ``step_NNNNNNN.pt`` keeping the last K, and ``best.pt``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    def save(self, state: dict, step: int, is_best: bool = False) -> Path:
        state = dict(state, format=FORMAT_VERSION, step=step)
        periodic = self.dir / f"step_{step:07d}.pt"
        atomic_save(state, periodic)
        # last.pt / best.pt are hard links to the periodic file (written once, not three
        # times), swapped in atomically; a copy where the filesystem has no hard links.
        _atomic_link(periodic, self.dir / "last.pt", state)
        if is_best:
            _atomic_link(periodic, self.dir / "best.pt", state)
        for old in self.periodic()[:-self.keep]:
            old.unlink(missing_ok=True)
        return periodic

    def periodic(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if re.fullmatch(r"step_\d{7}\.pt", p.name))

    def latest(self) -> Optional[Path]:
        last = self.dir / "last.pt"
        if last.is_file():
            return last
        found = self.periodic()
        return found[-1] if found else None
