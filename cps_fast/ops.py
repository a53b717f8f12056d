"""The ops shared by the trainer, the tests and the benchmarks, with backend dispatch.

Each public function takes ``backend``: ``"torch"`` (the eager reference in
``kernels/<op>.py``), ``"triton"`` (``cps_fast.kernels``), ``"cuda"`` / ``"cpp"`` (the
compiled ``cps_fast._C`` extension) or ``"auto"``. Backends register their implementations
with :func:`register`; a backend module is imported lazily, the first time it is asked for,
so that a machine without triton or without the extension still runs on the reference.

Input checks here are shape / dtype / device checks only (no host sync). Label *values* are
checked by the data layer when files are read; on CPU tensors they are checked here too
(cheap, no device involved), everywhere when ``CPS_FAST_CHECK_VALUES=1``, nowhere when ``=0``.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

import torch

from .errors import ConfigError
from .kernels.confusion_matrix import confusion_matrix_reference
from .kernels.cps_loss import cps_loss_reference
from .kernels.cross_entropy import cross_entropy_reference
from .kernels.ohem_cross_entropy import ohem_cross_entropy_reference

BACKENDS = ("torch", "triton", "cuda", "cpp")
OPS = ("cross_entropy", "ohem_cross_entropy", "cps_loss", "confusion_matrix")

# op -> backend -> implementation (same signature as the public function, minus backend)
_IMPLS: dict[str, dict[str, Callable]] = {op: {} for op in OPS}
# backend -> module that registers it on import
_BACKEND_MODULES = {"triton": "cps_fast.kernels.registry", "cuda": "cps_fast.ext",
                    "cpp": "cps_fast.ext"}
_load_errors: dict[str, str] = {}
# The order "auto" tries, by device type; re-ordered by measurement (benchmarks/).
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def register(op: str, backend: str):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if op not in _IMPLS or backend not in BACKENDS:
        raise ValueError(f"unknown op/backend {op!r}/{backend!r}")

    def deco(fn):
        _IMPLS[op][backend] = fn
        return fn
    return deco


for _op, _ref in (("cross_entropy", cross_entropy_reference),
                  ("ohem_cross_entropy", ohem_cross_entropy_reference),
                  ("cps_loss", cps_loss_reference),
                  ("confusion_matrix", confusion_matrix_reference)):
    register(_op, "torch")(_ref)


def _load_backend(backend: str) -> Optional[str]:
    """Import the module that registers ``backend``; returns why it is unavailable, or None."""
    if backend == "torch":
        return None
    if backend not in _load_errors:
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
            _load_errors[backend] = ""
        except Exception as e:  # ImportError, or a build/ABI mismatch of the extension
            _load_errors[backend] = f"{type(e).__name__}: {e}"
    return _load_errors[backend] or None


def available_backends(op: str, device_type: str) -> list[str]:
    """Backends that can run ``op`` on tensors of ``device_type`` right now."""
    out = []
    for b in BACKENDS:
        if _load_backend(b) is None and b in _IMPLS[op] and _runs_on(b, device_type):
            out.append(b)
    return out


def _runs_on(backend: str, device_type: str) -> bool:
    if backend == "cuda":
        return device_type == "cuda"
    if backend == "cpp":
        return device_type == "cpu"
    if backend == "triton":
        # Off the GPU, Triton runs only under its interpreter (tests).
        return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return True


def implements(op: str, backend: str) -> bool:
    """Whether ``backend`` (loaded on demand) has an implementation of ``op``."""
    return backend == "auto" or (backend in BACKENDS and _load_backend(backend) is None
                                 and backend in _IMPLS[op])


def resolved_backend(op: str, backend: str, device_type: str) -> str:
    """The backend that ``backend`` runs ``op`` with on ``device_type`` tensors: "auto"
    resolved to the first available one (what the benchmarks record as having run)."""
    if backend != "auto":
        return backend
    for b in AUTO_ORDER.get(device_type, ("torch",)):
        if _load_backend(b) is None and b in _IMPLS[op] and _runs_on(b, device_type):
            return b
    return "torch"


def resolve(op: str, backend: str, device_type: str) -> Callable:
    """The implementation of ``op`` for ``backend`` ("auto" picks the first available)."""
    if backend == "auto":
        return _IMPLS[op][resolved_backend(op, backend, device_type)]
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    why = _load_backend(backend)
    if why is not None:
        raise ConfigError(f"backend {backend!r} for {op} is unavailable: {why}")
    if backend not in _IMPLS[op]:
        raise ConfigError(f"backend {backend!r} has no implementation of {op}")
    if not _runs_on(backend, device_type):
        raise ConfigError(f"backend {backend!r} cannot run {op} on {device_type} tensors")
    return _IMPLS[op][backend]


# ----------------------------------------------------------------------------- checks
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_logits_target(op: str, logits: torch.Tensor, target: torch.Tensor,
                        ignore_index: int) -> None:
    """Shape/dtype checks before launch; value checks where they cost no device sync."""
    if logits.dim() != 4:
        raise ValueError(f"{op}: logits must be (N, C, H, W), got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOATS:
        raise ValueError(f"{op}: logits dtype {logits.dtype} is not a float type")
    n, c, h, w = logits.shape
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"{op}: target shape {tuple(target.shape)} does not match logits "
                         f"(N, H, W) = {(n, h, w)}")
    if target.dtype not in _INTS:
        raise ValueError(f"{op}: target dtype {target.dtype} is not an integer type")
    if target.device != logits.device:
        raise ValueError(f"{op}: target on {target.device}, logits on {logits.device}")
    if _is_compiling():
        return  # a data-dependent branch would break torch.compile's graph
    mode = os.environ.get("CPS_FAST_CHECK_VALUES", "")
    if mode == "1" or (target.device.type == "cpu" and mode != "0"):
        # On CUDA this would sync the host: only in debug mode (=1); =0 turns it off on
        # CPU tensors too (tests that look for host syncs in the step).
        bad = (target != ignore_index) & ((target < 0) | (target >= c))
        if bool(bad.any()):
            vals = torch.unique(target[bad])[:8].tolist()
            raise ValueError(f"{op}: target values {vals} outside [0, {c}) and not "
                             f"ignore_index={ignore_index}")


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


def check_pair(op: str, a: torch.Tensor, b: torch.Tensor) -> None:
    for name, x in (("logits_a", a), ("logits_b", b)):
        if x.dim() != 4 or x.dtype not in _FLOATS:
            raise ValueError(f"{op}: {name} must be a float (N, C, H, W) tensor, "
                             f"got {x.dtype} {tuple(x.shape)}")
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{op}: logits_a {a.dtype} {tuple(a.shape)} on {a.device} and "
                         f"logits_b {b.dtype} {tuple(b.shape)} on {b.device} must match")


# ----------------------------------------------------------------------------- public ops
def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  backend: str = "auto") -> torch.Tensor:
    """Mean CE over non-ignored pixels (0 when all are ignored). Differentiable in logits."""
    check_logits_target("cross_entropy", logits, target, ignore_index)
    fn = resolve("cross_entropy", backend, logits.device.type)
    return fn(logits, target, ignore_index)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7,
                       min_kept: int = 50000, ignore_index: int = 255,
                       backend: str = "auto") -> torch.Tensor:
    """OHEM CE with the official CPS rule applied per image (``min_kept`` per image; the
    loss is the mean over the images of their mean CE over the kept pixels; see
    kernels/ohem_cross_entropy.py)."""
    check_logits_target("ohem_cross_entropy", logits, target, ignore_index)
    fn = resolve("ohem_cross_entropy", backend, logits.device.type)
    return fn(logits, target, thresh, min_kept, ignore_index)


def cps_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
             valid: Optional[torch.Tensor] = None, is_labeled: Optional[torch.Tensor] = None,
             background_index: Optional[int] = 0, backend: str = "auto"):
    """(loss, stats): CE(a, argmax b) + CE(b, argmax a) and the agreement counts."""
    check_pair("cps_loss", logits_a, logits_b)
    n, _, h, w = logits_a.shape
    if valid is not None and tuple(valid.shape) != (n, h, w):
        raise ValueError(f"cps_loss: valid shape {tuple(valid.shape)} != {(n, h, w)}")
    if is_labeled is not None and tuple(is_labeled.shape) != (n,):
        raise ValueError(f"cps_loss: is_labeled shape {tuple(is_labeled.shape)} != {(n,)}")
    fn = resolve("cps_loss", backend, logits_a.device.type)
    return fn(logits_a, logits_b, valid, is_labeled, background_index)


def confusion_matrix(logits_or_pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255, backend: str = "auto") -> torch.Tensor:
    """(C, C) int64 confusion matrix, rows = target, columns = prediction."""
    if logits_or_pred.dim() == 4:
        if logits_or_pred.shape[1] != num_classes:
            raise ValueError(f"confusion_matrix: logits have {logits_or_pred.shape[1]} "
                             f"classes, num_classes={num_classes}")
        spatial = (logits_or_pred.shape[0],) + tuple(logits_or_pred.shape[2:])
    else:
        spatial = tuple(logits_or_pred.shape)
    if tuple(target.shape) != spatial:
        raise ValueError(f"confusion_matrix: target shape {tuple(target.shape)} != {spatial}")
    fn = resolve("confusion_matrix", backend, target.device.type)
    return fn(logits_or_pred, target, num_classes, ignore_index)
