"""Scale-out with PyTorch's own engine: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node=K -m cps_fast.train ...`` sets RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT; ``init`` reads them, picks NCCL on GPUs and gloo on CPUs, one
process per GPU (``cuda:LOCAL_RANK``). A plain ``python -m cps_fast.train`` is world size 1
and takes the same code path without a process group.

A failed or killed rank must not leave the others waiting forever: the process group gets
a timeout (``CPS_FAST_DIST_TIMEOUT`` seconds, default 600) and, on NCCL, asynchronous error
handling, so a collective that cannot complete raises on every surviving rank.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None       # None: no process group (single process)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (0, 0, 1 without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(f"WORLD_SIZE / RANK / LOCAL_RANK: not integers ({e})") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, local, world


def init(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun; returns (info, device)."""
    rank, local, world = env_world()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs "
                              f"are visible: one process per GPU")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return DistInfo(), dev
    backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl":
        # Surviving ranks abort a collective a dead peer never joins, instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=float(os.environ.get("CPS_FAST_DIST_TIMEOUT", "600")))
    if not dist.is_initialized():
        kw = {"device_id": dev} if use_cuda else {}
        try:
            dist.init_process_group(backend, timeout=timeout, **kw)
        except TypeError:  # torch without device_id
            dist.init_process_group(backend, timeout=timeout)
    return DistInfo(rank, local, world, backend), dev


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce when a process group exists; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_str(value: str) -> str:
    """Rank 0's ``value`` on every rank (e.g. a time-stamped run directory)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the whole CPS objective (both networks, one group)."""
    if not info.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    # Buffers (BN running statistics) follow rank 0 at every forward, so that all ranks
    # hold the same model for the distributed evaluation.
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def convert_sync_bn(net: nn.Module, info: DistInfo, device: torch.device,
                    wanted: bool) -> tuple[nn.Module, Optional[str]]:
    """SyncBatchNorm for multi-GPU runs (the paper's setting); returns (net, notice)."""
    if not (wanted and info.enabled):
        return net, None
    if device.type != "cuda":
        return net, ("model.sync_bn: SyncBatchNorm needs CUDA; CPU ranks keep per-process "
                     "BatchNorm statistics")
    return nn.SyncBatchNorm.convert_sync_batchnorm(net), None
