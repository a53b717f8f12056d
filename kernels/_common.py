"""Shared pieces of the Triton loss kernels: guarded triton import, input preparation,
launch-shape choice, the logits-tile helpers and the deterministic mean finaliser.

Nothing here queries CUDA at import time, and the module imports (with ``HAVE_TRITON =
False``) on a machine without triton, so the eager references beside the kernels always
import.

Layout. Logits are (N, C, H, W) in one of two memory layouts, both handled by index
arithmetic (a ``CHANNELS_LAST`` constexpr, no copy):
  * NCHW contiguous: element (n, c, s) at n*C*HW + c*HW + s (s = h*W + w); the pixel axis
    is contiguous, so a tile [BLOCK_P pixels, BLOCK_C classes] is loaded as BLOCK_C
    coalesced rows of BLOCK_P pixels, one pixel per lane and the whole class row in the
    thread (the "rows" variant, see TileConfig).
  * channels_last (NHWC): element at n*HW*C + s*C + c; a tile is one contiguous run of
    BLOCK_P*C elements (the padded classes are masked), lanes along the classes.
Any other stride pattern is made contiguous first (one copy, in prepare_logits).

Traffic. Every kernel reads each logit once from DRAM and writes each gradient element
once; the module headers of cross_entropy.py / cps_loss.py / ohem_cross_entropy.py give
the bytes per pixel. None of the launchers synchronises with the host: counts, the OHEM
selection state and the threshold live in device memory, launch shapes depend only on
the tensor shapes, so every op can be captured in a CUDA graph.

Grid. Every per-pixel kernel runs on a 2-D grid (pixel blocks of one image, image), so the
image index is ``program_id(1)``: no per-pixel division, the image's base offset is one
64-bit scalar, and in-image offsets (< C*HW < 2**31, checked) stay 32-bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

try:  # the references must import without triton
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None
    HAVE_TRITON = False

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CLASSES = 256          # a [BLOCK_P, 256] tile still fits the register file at BLOCK_P=16
INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- host checks
def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_runnable(op: str, *tensors: torch.Tensor) -> None:
    """ValueError before launch when triton cannot run on these tensors."""
    if not HAVE_TRITON:
        raise ValueError(f"{op}: triton is not installed; use backend='torch'")
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreter_on():
            continue
        raise ValueError(f"{op}: the triton backend runs on CUDA tensors (or on the CPU under "
                         f"TRITON_INTERPRET=1), got a tensor on {t.device}")


def check_logits(op: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{op}: logits must be (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in LOGITS_DTYPES:
        raise ValueError(f"{op}: the triton backend takes float32/bfloat16/float16 logits, got "
                         f"{x.dtype} (use backend='torch' for float64)")
    n, c, h, w = x.shape
    if c < 1 or c > MAX_CLASSES:
        raise ValueError(f"{op}: {c} classes; the triton kernels take 1..{MAX_CLASSES}")
    if c * h * w > INT32_MAX:
        raise ValueError(f"{op}: one image has C*H*W = {c * h * w} elements; the kernels use "
                         f"32-bit in-image offsets (at most {INT32_MAX})")
    if n > 65535:
        raise ValueError(f"{op}: batch {n} exceeds the grid's second dimension (65535)")


def prepare_logits(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor, channels_last): NCHW-contiguous or channels_last as is, anything else copied.

    The gradient is allocated with ``torch.empty_like`` (preserve_format), so it has the same
    layout as the (prepared) logits and is written with the same offsets.
    """
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def as_u8(mask: torch.Tensor) -> torch.Tensor:
    """A bool/uint8/int mask as a contiguous uint8 tensor (bool is viewed, not copied)."""
    mask = mask.contiguous()
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    if mask.dtype in (torch.uint8, torch.int8):
        return mask.view(torch.uint8)
    return (mask != 0).view(torch.uint8)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


PIXELS_PER_PROGRAM = 1024   # per-program partials: G = N*HW/1024 values for the finaliser


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of a per-pixel kernel.

    ``rows``: the row-per-thread variant (NCHW and BLOCK_C <= 64). There the kernel is the
    ``*_rows`` JIT variant compiled with HW *not* specialised on divisibility by 16, so the
    compiler cannot prove 16-byte alignment of ``c*HW + s`` and does not vectorise along
    the pixels: its blocked layout becomes one pixel per lane with all BLOCK_C classes in
    the thread (threadsPerWarp = [32, 1]). Every reduction over the classes is then inside
    a thread (no shuffles, no shared memory, no barriers), the per-pixel values (max, sum,
    argmax, target, ...) are one register each instead of one per (pixel, class-thread),
    and a warp's load of one class is still 32 consecutive pixels (64 B bf16 / 128 B
    fp32, fully coalesced). Measured by the AOT compile (sm_90, bf16, C=21): CE 133 -> 96
    registers, CPS 255 (+ spills) -> 168 at 128 pixels, barriers 34 -> 3: ~5x more bytes
    in flight per SM, which is what a memory-bound kernel needs (copy bandwidth x latency
    ~ 3.35 TB/s x ~1 us / 132 SMs ~ 25 KB per SM).
    Channels_last (the classes are the contiguous axis): lanes along the classes (a warp
    reads one pixel's C contiguous values), 32 pixels per tile so that the per-pixel
    values replicated across the class lanes stay few (CE 56 registers, CPS 108).
    """
    block_c: int
    block_p: int
    tiles: int
    num_warps: int
    rows: bool


def tile_config(num_classes: int, hw: int, channels_last: bool, tensors: int = 1,
                block_p: Optional[int] = None, tiles: Optional[int] = None,
                num_warps: Optional[int] = None) -> TileConfig:
    """The launch shape for C classes (padded to BLOCK_C = next pow2, masked, never
    loaded); block_p / tiles / num_warps override it (tests: every block size;
    benchmarks/kernels.py --sweep)."""
    block_c = next_pow2(num_classes)
    rows = (not channels_last) and block_c <= 64
    if rows:
        warps = num_warps or 4
        bp = 32 * warps * max(1, 32 // block_c)          # 1 pixel per lane for C <= 32
    elif channels_last:
        warps = num_warps or 4
        bp = max(16, 1024 // block_c)
    else:                                                # NCHW with C > 64: vectorised tile
        warps = num_warps or 4 * tensors
        bp = max(16, 4096 // block_c // tensors)
    block_p = block_p or bp
    full = max(1, -(-hw // block_p))
    tiles = tiles or max(1, min(PIXELS_PER_PROGRAM // block_p, full))
    return TileConfig(block_c, block_p, tiles, warps, rows)


def rows_variant(kernel):
    """The row-per-thread JIT variant of a per-pixel kernel (see :class:`TileConfig`)."""
    return triton.jit(kernel.fn, do_not_specialize=["HW"])


def define_op(qualname: str, schema: str, impl, fake, backward=None, setup_context=None):
    """Define a torch.library custom op (``custom_op`` + ``register_fake`` +
    ``register_autograd``, all present since torch 2.4) with an explicit schema (robust to
    the ``from __future__ import annotations`` string annotations of the kernel modules),
    once: a second import of a module (e.g. as both ``kernels.x`` and
    ``cps_fast.kernels.x``) reuses the op already defined. Returns the OpOverloadPacket."""
    ns, name = qualname.split("::")
    try:
        return getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        pass
    torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
    torch.library.register_fake(qualname)(fake)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    return getattr(getattr(torch.ops, ns), name)


def empty_like_prepared(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An empty tensor with the layout :func:`prepare_logits` gives ``x`` (used by both the
    real implementations and the fake ones, so their strides agree)."""
    cl = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty_like(x, dtype=dtype, memory_format=fmt)


# ----------------------------------------------------------------------------- jit helpers
if HAVE_TRITON:

    @triton.jit
    def load_logits_tile(img_ptr, s_offs, HW, NUM_CLASSES: tl.constexpr,
                         BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
        """Load a [BLOCK_P, BLOCK_C] tile of one image's logits as fp32.

        Padded classes read -inf (so they vanish from max / sum-exp); pixels past HW read 0
        (finite, so their rows produce no NaN; they are masked everywhere downstream).
        Returns (x, offs, mask2d) so the gradient is stored with the same offsets.
        """
        c_offs = tl.arange(0, BLOCK_C)
        pmask = s_offs < HW
        cmask = c_offs < NUM_CLASSES
        if CHANNELS_LAST:
            offs = s_offs[:, None] * NUM_CLASSES + c_offs[None, :]
        else:
            offs = c_offs[None, :] * HW + s_offs[:, None]
        mask = pmask[:, None] & cmask[None, :]
        x = tl.load(img_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(cmask[None, :], x, float("-inf"))
        return x, offs, mask

    @triton.jit
    def softmax_stats(x, BLOCK_C: tl.constexpr):
        """Row max, argmax (ties -> lowest class, as torch.argmax), exp(x - max) and its sum.

        One fused max/argmax reduction plus one sum per row; the padded classes hold -inf and
        contribute exp(-inf) = 0. With |x| up to 1e4 every intermediate stays finite.
        """
        c_offs = tl.arange(0, BLOCK_C)
        m = tl.max(x, axis=1)
        # lowest index among the maxima; BLOCK_C when none matches (NaN rows: never read)
        am = tl.min(tl.where(x == m[:, None], c_offs[None, :], BLOCK_C), axis=1)
        e = tl.exp(x - m[:, None])
        s = tl.sum(e, axis=1)
        return m, am, e, s

    @triton.jit
    def pick(x, idx, BLOCK_C: tl.constexpr):
        """x[row, idx[row]] by compare-and-sum (no memory access, so an out-of-range idx
        reads 0 instead of faulting)."""
        c_offs = tl.arange(0, BLOCK_C)
        return tl.sum(tl.where(c_offs[None, :] == idx[:, None], x, 0.0), axis=1)

    @triton.jit
    def finalize_mean_kernel(sum_part_ptr, cnt_part_ptr, G, loss_ptr, inv_count_ptr,
                             BLOCK: tl.constexpr):
        """One program: loss = sum(partials) / max(sum(counts), 1), and 1 / max(count, 1).

        The per-program partials are added in a fixed order (strided loop + tree
        reduction), so the loss is bitwise reproducible run to run: no float atomics.
        """
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        cnt = tl.zeros([BLOCK], dtype=tl.int64)
        for start in range(0, G, BLOCK):
            idx = start + offs
            m = idx < G
            acc += tl.load(sum_part_ptr + idx, mask=m, other=0.0)
            cnt += tl.load(cnt_part_ptr + idx, mask=m, other=0).to(tl.int64)
        total = tl.sum(acc, axis=0)
        count = tl.maximum(tl.sum(cnt, axis=0).to(tl.float32), 1.0)
        inv = 1.0 / count
        tl.store(loss_ptr, (total * inv).to(loss_ptr.dtype.element_ty))
        tl.store(inv_count_ptr, inv)


# One program adds the per-program partials (G = N*HW/1024: 4096 for VOC, 10000 for
# Cityscapes): 2048 per iteration over 8 warps keeps it to a handful of dependent
# iterations (a few microseconds) without many registers.
FINALIZE_BLOCK = 2048
FINALIZE_WARPS = 8

# (classes, dtype, channels_last) compiled ahead of time for every per-pixel kernel: the
# VOC (21) and Cityscapes (19) class counts, both layouts, bf16 (AMP) and fp32.
AOT_VARIANTS = ((21, "bf16", False), (21, "bf16", True), (19, "fp32", False),
                (19, "fp32", True))


def finalize_aot_spec():
    return dict(name="finalize_mean", fn=finalize_mean_kernel,
                signature={"sum_part_ptr": "*fp32", "cnt_part_ptr": "*i32", "G": "i32",
                           "loss_ptr": "*bf16", "inv_count_ptr": "*fp32"},
                constexprs=dict(BLOCK=FINALIZE_BLOCK),
                divisible=("sum_part_ptr", "cnt_part_ptr"), num_warps=FINALIZE_WARPS)


def finalize_mean(sum_part: torch.Tensor, cnt_part: torch.Tensor, loss_dtype: torch.dtype):
    """(loss 0-dim in ``loss_dtype``, inv_count fp32 0-dim) from per-program partials."""
    dev = sum_part.device
    loss = torch.empty((), dtype=loss_dtype, device=dev)
    inv = torch.empty((), dtype=torch.float32, device=dev)
    finalize_mean_kernel[(1,)](sum_part, cnt_part, sum_part.numel(), loss, inv,
                               BLOCK=FINALIZE_BLOCK, num_warps=FINALIZE_WARPS)
    return loss, inv


def scale_grad(grad: torch.Tensor, grad_out: torch.Tensor, inv_count: torch.Tensor):
    """The backward of the 'gradient in the forward' ops: stored * (grad_out / count).

    The stored gradient is the *unnormalised* (softmax - onehot) * valid: values in [-1, 1],
    so fp16 storage keeps full precision (normalised by 1/count ~ 2e-7 it would fall into
    fp16's subnormal range before GradScaler could scale it). One elementwise pass (read +
    write the gradient once) with a device scalar: no host sync, graph-capturable.
    """
    scale = grad_out.float() * inv_count          # 0-dim fp32 on the device
    return grad * scale                            # 0-dim operand: result keeps grad's dtype


def pointer_hint(x: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A tensor to pass for an optional pointer argument (never read when absent)."""
    return x if x is not None else fallback
