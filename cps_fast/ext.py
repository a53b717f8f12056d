"""The compiled backends: loads ``cps_fast._C`` and registers it into :mod:`cps_fast.ops` as
``"cpp"`` (CPU tensors, host C++ loops) and ``"cuda"`` (CUDA tensors, CUDA C++ kernels).

``cps_fast.ops`` imports this module lazily, the first time one of the two backends is asked
for. When ``_C`` is missing (not built, ``CPS_FAST_SKIP_EXT=1``, no compiler), built from
other sources than the ``csrc/`` beside it (stale), or disabled with ``CPS_FAST_DISABLE_EXT=1``,
this module warns once with a one-line message and raises ImportError; ``ops`` then reports
the backend as unavailable and ``auto`` falls back to the torch reference.

``_C`` does not link libtorch: each op passes raw addresses (``data_ptr()``), sizes, element
strides and, on CUDA, the current stream handle. All outputs and workspaces are allocated
here with torch (so on CUDA they come from the caching allocator, on the caller's stream).
The ops are ``torch.library.custom_op``s with fake (meta) implementations and autograd: the
forward writes the unscaled per-pixel gradient ``(softmax - onehot) * kept`` into a fresh
buffer and returns ``1/count`` as a device scalar (OHEM, selected per image: one weight per
image); backward multiplies the two by the upstream gradient (no host sync, nothing written
into saved inputs).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .kernels.confusion_matrix import confusion_matrix_reference
from .kernels.cps_loss import cps_loss_reference
from .kernels.cross_entropy import cross_entropy_reference
from .kernels.ohem_cross_entropy import ohem_cross_entropy_reference

ABI_VERSION = 2  # must equal _C.ABI_VERSION (csrc/bindings.cpp)
REBUILD_HINT = "rebuild: pip install -e . (or python setup.py build_ext --inplace)"
_SOURCE_SUFFIXES = (".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cu")


def source_stamp(root: Path) -> str:
    """sha256 over csrc/ sources and CMakeLists.txt (same algorithm as setup.py)."""
    h = hashlib.sha256()
    files = sorted(p for p in (root / "csrc").rglob("*")
                   if p.is_file() and p.suffix in _SOURCE_SUFFIXES)
    files.append(root / "CMakeLists.txt")
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _fail(msg: str):
    line = f"cps_fast: the compiled extension is unavailable ({msg}); using the torch backend"
    warnings.warn(line, RuntimeWarning, stacklevel=3)
    raise ImportError(msg)


def _load():
    if os.environ.get("CPS_FAST_DISABLE_EXT") == "1":
        _fail("disabled by CPS_FAST_DISABLE_EXT=1")
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as e:
        _fail(f"cps_fast._C not built or not importable: {e}; {REBUILD_HINT}")
    if getattr(_C, "ABI_VERSION", None) != ABI_VERSION:
        _fail(f"cps_fast._C has ABI {getattr(_C, 'ABI_VERSION', None)}, expected {ABI_VERSION}; "
              f"{REBUILD_HINT}")
    if os.environ.get("CPS_FAST_ALLOW_STALE") != "1":
        why = stale_reason(_C, Path(__file__).resolve().parent.parent)
        if why:
            _fail(why)
    return _C


def stale_reason(C, root: Path) -> Optional[str]:
    """Why the built module ``C`` does not match the sources under ``root`` (None if it does,
    or if there are no sources to compare with, e.g. an installed wheel)."""
    if not ((root / "csrc").is_dir() and (root / "CMakeLists.txt").is_file()):
        return None
    built = str(getattr(C, "BUILD_STAMP", "")).rpartition("+")[2]
    now = source_stamp(root)
    if built == now:
        return None
    return (f"cps_fast._C is stale: built from sources {built or '?'}, csrc/ is now {now}; "
            f"{REBUILD_HINT}")


_C = _load()
HAS_CUDA = bool(_C.HAS_CUDA)

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ITYPES = {torch.int64: 0, torch.uint8: 1, torch.int32: 2}


# ----------------------------------------------------------------------------- helpers
def _logits(x: Tensor):
    """(tensor, _C.View) with H*W collapsed to one strided pixel index (NCHW or channels_last)."""
    n, c, h, w = x.shape
    if x.is_contiguous():
        return x, _C.View(n, c, h * w, c * h * w, h * w, 1)
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, _C.View(n, c, h * w, h * w * c, 1, c)
    x = x.contiguous()
    return x, _C.View(n, c, h * w, c * h * w, h * w, 1)


def _labels(t: Tensor):
    if t.dtype not in _ITYPES:
        t = t.to(torch.int64)
    return t.contiguous(), _ITYPES[t.dtype]


def _mask(m: Optional[Tensor], device) -> Optional[Tensor]:
    if m is None:
        return None
    m = m.to(device=device)
    if m.dtype != torch.bool:
        m = m != 0
    return m.contiguous().view(torch.uint8)


def _grad_like(x: Tensor, need: bool) -> Tensor:
    if not need:
        return x.new_empty(0)
    g = torch.empty_like(x)  # same strides as x (dense, non-overlapping)
    assert g.stride() == x.stride()
    return g


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _stream(x: Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def _partials(x: Tensor, n: int, hw: int) -> Tensor:
    return torch.empty(_C.device_partial_rows(n, hw) * 6, dtype=torch.float64, device=x.device)


def _scalars(x: Tensor):
    loss = torch.empty((), dtype=torch.float32, device=x.device)
    return loss, torch.empty_like(loss)


def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _supported(x: Tensor) -> bool:
    return x.dtype in _DTYPES and x.numel() > 0 and (x.device.type == "cpu" or HAS_CUDA)


# ----------------------------------------------------------------------------- cross-entropy
@torch.library.custom_op("cps_fast_ext::cross_entropy", mutates_args=())
def _ce_op(logits: Tensor, target: Tensor, ignore_index: int,
           need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    x, v = _logits(logits)
    t, tc = _labels(target)
    loss, inv = _scalars(x)
    g = _grad_like(x, need_grad)
    if x.is_cuda:
        _C.ce_device(v, _DTYPES[x.dtype], x.data_ptr(), t.data_ptr(), tc, ignore_index, _ptr(g),
                     loss.data_ptr(), inv.data_ptr(), _partials(x, v.N, v.HW).data_ptr(),
                     x.device.index, _stream(x))
    else:
        _C.ce_host(v, _DTYPES[x.dtype], x.data_ptr(), t.data_ptr(), tc, ignore_index, _ptr(g),
                   loss.data_ptr(), inv.data_ptr(), torch.get_num_threads())
    return loss, inv, g


@_ce_op.register_fake
def _(logits, target, ignore_index, need_grad):
    loss = logits.new_empty((), dtype=torch.float32)
    return loss, torch.empty_like(loss), (torch.empty_like(logits) if need_grad
                                          else logits.new_empty(0))


def _no_zero_grads(ctx, outputs) -> None:
    # inv_count, the gradient buffers and the stats carry no gradient: without this, autograd
    # would materialise a zero tensor the size of the logits for each of them in backward.
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


def _save_grads(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    _no_zero_grads(ctx, output[1:])


def _scaled(g: Tensor, s: Tensor):
    if g.numel() == 0:
        raise RuntimeError("cps_fast: backward through an op that ran without requires_grad")
    return g * s  # s: fp32 0-dim, so the product keeps g's dtype and is computed in fp32


def _ce_backward(ctx, g_loss, g_inv, g_grad):
    if g_loss is None:
        return None, None, None, None
    inv, g = ctx.saved_tensors
    return _scaled(g, g_loss * inv), None, None, None


_ce_op.register_autograd(_ce_backward, setup_context=_save_grads)


# ----------------------------------------------------------------------------- OHEM
# Selected per image (kernels/ohem_cross_entropy.py). The gradient of image n is scaled by
# its own weight 1 / (num_counted_images * count_n), so the op returns the weights (N,)
# instead of one 1/count; it also returns each pixel's key (bits of p, -1 where not valid)
# and each image's threshold (+inf: every valid pixel kept), as the Triton op does: the
# tests read the kept set from them.
@torch.library.custom_op("cps_fast_ext::ohem_cross_entropy", mutates_args=())
def _ohem_op(logits: Tensor, target: Tensor, thresh: float, min_kept: int, ignore_index: int,
             need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, v = _logits(logits)
    t, tc = _labels(target)
    loss = torch.empty((), dtype=torch.float32, device=x.device)
    weight = torch.empty(v.N, dtype=torch.float32, device=x.device)
    threshold = torch.empty_like(weight)
    key = torch.empty(target.shape, dtype=torch.int32, device=x.device)
    g = _grad_like(x, need_grad)
    if x.is_cuda:
        ws = torch.empty(_C.device_ohem_workspace_bytes(v.N, v.HW), dtype=torch.uint8,
                         device=x.device)
        _C.ohem_device(v, _DTYPES[x.dtype], x.data_ptr(), t.data_ptr(), tc, float(thresh),
                       min_kept, ignore_index, _ptr(g), loss.data_ptr(), weight.data_ptr(),
                       key.data_ptr(), threshold.data_ptr(),
                       _partials(x, v.N, v.HW).data_ptr(), ws.data_ptr(), x.device.index,
                       _stream(x))
    else:
        _C.ohem_host(v, _DTYPES[x.dtype], x.data_ptr(), t.data_ptr(), tc, float(thresh),
                     min_kept, ignore_index, _ptr(g), loss.data_ptr(), weight.data_ptr(),
                     key.data_ptr(), threshold.data_ptr(), torch.get_num_threads())
    return loss, weight, g, key, threshold


@_ohem_op.register_fake
def _(logits, target, thresh, min_kept, ignore_index, need_grad):
    n = logits.shape[0]
    loss = logits.new_empty((), dtype=torch.float32)
    return (loss, logits.new_empty((n,), dtype=torch.float32),
            torch.empty_like(logits) if need_grad else logits.new_empty(0),
            target.new_empty(target.shape, dtype=torch.int32),
            logits.new_empty((n,), dtype=torch.float32))


def _ohem_setup(ctx, inputs, output):
    _, weight, g, key, threshold = output
    ctx.save_for_backward(weight, g)
    # none of the outputs but the loss carries a gradient; no zero tensors for them in backward
    ctx.mark_non_differentiable(weight, g, key, threshold)
    ctx.set_materialize_grads(False)


def _ohem_backward(ctx, g_loss, g_weight, g_grad, g_key, g_thr):
    if g_loss is None:
        return None, None, None, None, None, None
    weight, g = ctx.saved_tensors
    if g.numel() == 0:
        raise RuntimeError("cps_fast: backward through an op that ran without requires_grad")
    # per-image scale in fp32, written in g's dtype in the same pass (a 16-bit scale would
    # lose 1/count ~ 1e-6 to fp16's subnormals)
    scale = (g_loss.float() * weight).view(-1, 1, 1, 1)
    return torch.mul(g, scale, out=torch.empty_like(g)), None, None, None, None, None


_ohem_op.register_autograd(_ohem_backward, setup_context=_ohem_setup)


# ----------------------------------------------------------------------------- CPS loss
@torch.library.custom_op("cps_fast_ext::cps_loss", mutates_args=())
def _cps_op(a: Tensor, b: Tensor, valid: Optional[Tensor], is_labeled: Optional[Tensor],
            background_index: int, need_a: bool,
            need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    xa, v = _logits(a)
    xb, vb = _logits(b)
    if (vb.N, vb.C, vb.HW) != (v.N, v.C, v.HW) or xa.stride() != xb.stride():
        xa, xb = xa.contiguous(), xb.contiguous()
        xa, v = _logits(xa)
    m = _mask(valid, xa.device)
    lab = _mask(is_labeled, xa.device)
    loss, inv = _scalars(xa)
    stats = torch.empty(4, dtype=torch.int64, device=xa.device)
    ga, gb = _grad_like(xa, need_a), _grad_like(xb, need_b)
    if xa.is_cuda:
        _C.cps_device(v, _DTYPES[xa.dtype], xa.data_ptr(), xb.data_ptr(), _ptr(m), _ptr(lab),
                      background_index, _ptr(ga), _ptr(gb), loss.data_ptr(), inv.data_ptr(),
                      stats.data_ptr(), _partials(xa, v.N, v.HW).data_ptr(), xa.device.index,
                      _stream(xa))
    else:
        _C.cps_host(v, _DTYPES[xa.dtype], xa.data_ptr(), xb.data_ptr(), _ptr(m), _ptr(lab),
                    background_index, _ptr(ga), _ptr(gb), loss.data_ptr(), inv.data_ptr(),
                    stats.data_ptr(), torch.get_num_threads())
    return loss, inv, stats, ga, gb


@_cps_op.register_fake
def _(a, b, valid, is_labeled, background_index, need_a, need_b):
    loss = a.new_empty((), dtype=torch.float32)
    return (loss, torch.empty_like(loss), a.new_empty(4, dtype=torch.int64),
            torch.empty_like(a) if need_a else a.new_empty(0),
            torch.empty_like(b) if need_b else b.new_empty(0))


def _cps_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[3], output[4])
    _no_zero_grads(ctx, output[1:])


def _cps_backward(ctx, g_loss, g_inv, g_stats, g_ga, g_gb):
    if g_loss is None:
        return None, None, None, None, None, None, None
    inv, ga, gb = ctx.saved_tensors
    s = g_loss * inv
    da = _scaled(ga, s) if ctx.needs_input_grad[0] else None
    db = _scaled(gb, s) if ctx.needs_input_grad[1] else None
    return da, db, None, None, None, None, None


_cps_op.register_autograd(_cps_backward, setup_context=_cps_setup)


# ----------------------------------------------------------------------------- confusion matrix
@torch.library.custom_op("cps_fast_ext::confusion_matrix", mutates_args=())
def _cm_op(x: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    t, tc = _labels(target)
    out = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=t.device)
    if x.dim() == 4:
        xx, v = _logits(x)
        dt, pc = _DTYPES[xx.dtype], 0
    else:
        n = x.shape[0]
        hw = x.numel() // max(n, 1)
        xx, pc = _labels(x)
        v, dt = _C.View(n, 0, hw, hw, 0, 1), -1
    if t.is_cuda:
        _C.confusion_device(v, dt, xx.data_ptr(), pc, t.data_ptr(), tc, num_classes,
                            ignore_index, out.data_ptr(), t.device.index, _stream(t))
    else:
        _C.confusion_host(v, dt, xx.data_ptr(), pc, t.data_ptr(), tc, num_classes,
                          ignore_index, out.data_ptr(), torch.get_num_threads())
    return out.view(num_classes, num_classes)


@_cm_op.register_fake
def _(x, target, num_classes, ignore_index):
    return target.new_empty((num_classes, num_classes), dtype=torch.int64)


# ----------------------------------------------------------------------------- public impls
def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    if not _supported(logits):
        return cross_entropy_reference(logits, target, ignore_index)
    loss, _, _ = _ce_op(logits, target, int(ignore_index), _needs_grad(logits))
    return loss.to(logits.dtype)


def ohem_cross_entropy(logits: Tensor, target: Tensor, thresh: float = 0.7,
                       min_kept: int = 50000, ignore_index: int = 255) -> Tensor:
    if not _supported(logits):
        return ohem_cross_entropy_reference(logits, target, thresh, min_kept, ignore_index)
    loss = _ohem_op(logits, target, float(thresh), int(min_kept), int(ignore_index),
                    _needs_grad(logits))[0]
    return loss.to(logits.dtype)


def cps_loss(logits_a: Tensor, logits_b: Tensor, valid: Optional[Tensor] = None,
             is_labeled: Optional[Tensor] = None, background_index: Optional[int] = 0):
    if not _supported(logits_a):
        return cps_loss_reference(logits_a, logits_b, valid, is_labeled, background_index)
    bg = -1 if background_index is None else int(background_index)
    loss, _, stats, _, _ = _cps_op(logits_a, logits_b, valid, is_labeled, bg,
                                   _needs_grad(logits_a), _needs_grad(logits_b))
    return loss.to(logits_a.dtype), stats


def confusion_matrix(logits_or_pred: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int = 255) -> Tensor:
    x = logits_or_pred
    if ((x.dim() == 4 and not _supported(x)) or x.numel() == 0
            or (x.device.type == "cuda" and not HAS_CUDA) or x.device != target.device):
        return confusion_matrix_reference(x, target, num_classes, ignore_index)
    return _cm_op(x, target, int(num_classes), int(ignore_index))


for _name, _fn in (("cross_entropy", cross_entropy), ("ohem_cross_entropy", ohem_cross_entropy),
                   ("cps_loss", cps_loss), ("confusion_matrix", confusion_matrix)):
    ops.register(_name, "cpp")(_fn)
    if HAS_CUDA:
        ops.register(_name, "cuda")(_fn)
