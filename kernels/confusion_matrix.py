"""Confusion matrix (rows: target class, columns: predicted class) for evaluation.

Accepts logits (N, C, H, W), whose argmax is the prediction (``torch.argmax`` semantics:
ties go to the lowest class index, and a row holding a NaN predicts its first NaN, as
``torch.argmax`` treats NaN as larger than every number), or integer predictions (N, H, W).
A pixel is counted when its target is neither ``ignore_index`` nor outside [0, C) and its
prediction is inside [0, C); everything else is left out (an out-of-range label is not an
error here, and never an address in the kernel).

The reference accumulates with ``scatter_add_`` into a fixed-size buffer (uncounted pixels go
to a spill slot that is dropped), so it has no data-dependent shape and never syncs the host.
"""

from __future__ import annotations

import torch


def confusion_matrix_reference(logits_or_pred: torch.Tensor, target: torch.Tensor,
                               num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(C, C) int64. Accepts logits (N,C,H,W) (argmax taken) or predictions (N,H,W)."""
    if logits_or_pred.dim() == 4:
        pred = logits_or_pred.argmax(1)
    else:
        pred = logits_or_pred
    t = target.long().reshape(-1)
    p = pred.long().reshape(-1)
    counted = (t != ignore_index) & (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    spill = num_classes * num_classes
    idx = torch.where(counted, t * num_classes + p, torch.full_like(t, spill))
    cm = torch.zeros(spill + 1, dtype=torch.int64, device=t.device)
    cm.scatter_add_(0, idx, torch.ones_like(idx))
    return cm[:spill].reshape(num_classes, num_classes)


# ============================================================================== Triton
# One pass: (argmax of the logits | the predictions) + target -> bin t*C + p, counted in a
# per-program histogram in registers (tl.histogram, accumulated over the program's tiles)
# and added to the int64 (C, C) result with integer atomics on the non-empty bins only
# (like ohem_cross_entropy's pass 1). Integer atomics make the result exact and
# deterministic whatever their order. Above HIST_MAX_BINS bins (C > 45) a register
# histogram no longer fits, and each counted pixel adds to its bin with one global atomic
# (spread over C^2 >= 2116 addresses, so contention stays low).
#
# Bytes per pixel: read C*es (logits) or the prediction (1..8 B), plus the target (1..8 B);
# nothing per pixel is written. Cityscapes 19x1024x2048 fp32 (one image, as evaluation
# calls it): 2.1 M px * (76 + 8) B = 176 MB, ~55 us at 3.2 TB/s. The argmax map never
# exists in memory (the unfused path writes and rereads it: + 16 B per pixel in int64).
from ._common import (HAVE_TRITON, INT32_MAX, check_logits, check_runnable,  # noqa: E402
                      define_op, next_pow2, prepare_logits, rows_variant, tile_config)

HIST_MAX_BINS = 2048            # the register histogram's size limit (OHEM pass 1 uses 2048)
PRED_BLOCK_P = 512              # pixels per tile of the prediction (N, H, W) variant
PRED_WARPS = 4
PRED_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
TARGET_DTYPES = PRED_DTYPES


def hist_constexprs(num_classes: int) -> dict:
    """USE_HIST / HIST_BINS: C*C real bins + one spill bin, padded to a power of two, when
    that fits HIST_MAX_BINS; else no register histogram (one global atomic per counted
    pixel) and a 1-bin placeholder."""
    bins = next_pow2(num_classes * num_classes + 1)
    return dict(USE_HIST=True, HIST_BINS=bins) if bins <= HIST_MAX_BINS else \
        dict(USE_HIST=False, HIST_BINS=1)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import load_logits_tile

    @triton.jit
    def argmax_nan_first(x, BLOCK_C: tl.constexpr):
        """Row argmax with torch.argmax's semantics: the first NaN of the row if it holds one,
        else the lowest index among the maxima. Padded classes hold -inf (load_logits_tile);
        they can only tie with an all -inf row, whose answer, class 0, is lower.

        NaN is handled explicitly because max reductions differ on it (the GPU's max.f32
        drops a NaN operand, numpy under the interpreter propagates it)."""
        c_offs = tl.arange(0, BLOCK_C)
        is_nan = x != x
        first_nan = tl.min(tl.where(is_nan, c_offs[None, :], BLOCK_C), axis=1)
        xm = tl.where(is_nan, float("-inf"), x)
        m = tl.max(xm, axis=1)
        am = tl.min(tl.where(xm == m[:, None], c_offs[None, :], BLOCK_C), axis=1)
        return tl.where(first_nan < BLOCK_C, first_nan, am)

    @triton.jit
    def confusion_matrix_kernel(x_ptr, target_ptr, out_ptr, HW, ignore_index,
                                NUM_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_P: tl.constexpr, TILES: tl.constexpr,
                                CHANNELS_LAST: tl.constexpr, FROM_LOGITS: tl.constexpr,
                                USE_HIST: tl.constexpr, HIST_BINS: tl.constexpr):
        """Grid (cdiv(HW, BLOCK_P*TILES), N). x is the logits (FROM_LOGITS) or the (N, H, W)
        predictions; out the (C, C) int64 result, zeroed before the launch.

        USE_HIST: a register histogram of HIST_BINS bins over the program's pixels, then one
        atomic per non-empty bin; otherwise one atomic per counted pixel (HIST_BINS = 1)."""
        pid_s = tl.program_id(0)
        n = tl.program_id(1)
        pix = n.to(tl.int64) * HW                    # 64-bit image base, 32-bit offsets in it
        SPILL: tl.constexpr = NUM_CLASSES * NUM_CLASSES
        hist = tl.zeros([HIST_BINS], dtype=tl.int32)
        for i in range(TILES):
            s_offs = (pid_s * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = s_offs < HW
            if FROM_LOGITS:
                x, _, _ = load_logits_tile(x_ptr + pix * NUM_CLASSES, s_offs, HW, NUM_CLASSES,
                                           BLOCK_C, CHANNELS_LAST)
                pred = argmax_nan_first(x, BLOCK_C).to(tl.int64)
            else:
                pred = tl.load(x_ptr + pix + s_offs, mask=pmask, other=0).to(tl.int64)
            t = tl.load(target_ptr + pix + s_offs, mask=pmask, other=0).to(tl.int64)
            counted = (pmask & (t != ignore_index) & (t >= 0) & (t < NUM_CLASSES)
                       & (pred >= 0) & (pred < NUM_CLASSES))
            b = tl.where(counted, t * NUM_CLASSES + pred, SPILL).to(tl.int32)
            if USE_HIST:
                hist += tl.histogram(b, HIST_BINS)
            else:
                one = tl.full([BLOCK_P], 1, dtype=tl.int64)
                tl.atomic_add(out_ptr + b, one, mask=counted)
        if USE_HIST:
            bins = tl.arange(0, HIST_BINS)
            tl.atomic_add(out_ptr + bins, hist.to(tl.int64), mask=(bins < SPILL) & (hist > 0))

    confusion_matrix_kernel_rows = rows_variant(confusion_matrix_kernel)

    def _check_int(op: str, what: str, x: torch.Tensor) -> None:
        if x.dtype not in PRED_DTYPES:
            raise ValueError(f"{op}: {what} dtype {x.dtype} is not an integer type "
                             f"({', '.join(str(d).replace('torch.', '') for d in PRED_DTYPES)})")

    def _launch_shape(x: torch.Tensor, hw: int, block_p=None, tiles=None, num_warps=None):
        """(kernel, block_c, block_p, tiles, num_warps, channels_last)."""
        if x.dim() == 4:
            cl = prepare_logits(x)[1]
            cfg = tile_config(x.shape[1], hw, cl, 1, block_p, tiles, num_warps)
            kernel = confusion_matrix_kernel_rows if cfg.rows else confusion_matrix_kernel
            return kernel, cfg.block_c, cfg.block_p, cfg.tiles, cfg.num_warps, cl
        bp = block_p or PRED_BLOCK_P
        full = max(1, -(-hw // bp))
        tl_ = tiles or max(1, min(4096 // bp, full))
        return confusion_matrix_kernel, 1, bp, tl_, num_warps or PRED_WARPS, False

    def _cm_impl(x, target, num_classes, ignore_index, block_p=None, tiles=None,
                 num_warps=None):
        """(C, C) int64; block_p / tiles / num_warps override the launch shape (tests)."""
        op = "confusion_matrix"
        check_runnable(op, x, target)
        _check_int(op, "target", target)
        if x.dim() == 4:
            check_logits(op, x)
            if x.shape[1] != num_classes:
                raise ValueError(f"{op}: logits have {x.shape[1]} classes, "
                                 f"num_classes={num_classes}")
            n, _, h, w = x.shape
            x, _ = prepare_logits(x)
        elif x.dim() == 3:
            _check_int(op, "predictions", x)
            n, h, w = x.shape
            x = x.contiguous()
            if n > 65535:
                raise ValueError(f"{op}: batch {n} exceeds the grid's second dimension (65535)")
            if h * w > INT32_MAX:
                raise ValueError(f"{op}: {h * w} pixels per image; at most {INT32_MAX}")
        else:
            raise ValueError(f"{op}: expected logits (N, C, H, W) or predictions (N, H, W), "
                             f"got shape {tuple(x.shape)}")
        if tuple(target.shape) != (n, h, w):
            raise ValueError(f"{op}: target shape {tuple(target.shape)} != {(n, h, w)}")
        if num_classes < 1 or num_classes * num_classes + 1 > INT32_MAX:
            raise ValueError(f"{op}: num_classes={num_classes} out of range")
        out = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=target.device)
        hw = h * w
        kernel, block_c, bp, tiles_, warps, cl = _launch_shape(x, hw, block_p, tiles, num_warps)
        g0 = triton.cdiv(hw, bp * tiles_) if hw > 0 else 0
        if g0 * n > 0:
            kernel[(g0, n)](x, target.contiguous(), out, hw, int(ignore_index),
                            NUM_CLASSES=num_classes, BLOCK_C=block_c, BLOCK_P=bp, TILES=tiles_,
                            CHANNELS_LAST=cl, FROM_LOGITS=x.dim() == 4,
                            num_warps=warps, **hist_constexprs(num_classes))
        return out

    def _cm_fake(x, target, num_classes, ignore_index):
        return target.new_empty((num_classes, num_classes), dtype=torch.int64)

    confusion_matrix_op = define_op(
        "cps_fast::confusion_matrix_triton",
        "(Tensor logits_or_pred, Tensor target, int num_classes, int ignore_index) -> Tensor",
        lambda x, target, num_classes, ignore_index: _cm_impl(x, target, num_classes,
                                                              ignore_index),
        _cm_fake)

    def confusion_matrix_triton(logits_or_pred: torch.Tensor, target: torch.Tensor,
                                num_classes: int, ignore_index: int = 255) -> torch.Tensor:
        """(C, C) int64 with the reference's semantics, argmax fused in; no host sync."""
        return confusion_matrix_op(logits_or_pred, target, int(num_classes), int(ignore_index))

    def aot_specs():
        """Evaluation's shapes: logits of one VOC (C=21, 512^2) or Cityscapes (C=19,
        1024x2048) image in fp32 (the evaluator's summed logits) and bf16, both layouts; the
        prediction variant; the largest register histogram (C=45, 2048 bins); and the
        per-pixel-atomic variant at C=150 (ADE20K-sized)."""
        out = []
        for c, dt, cl in ((21, "fp32", False), (21, "bf16", True), (19, "fp32", False),
                          (19, "bf16", False), (19, "fp32", True), (45, "fp32", False),
                          (150, "fp32", False)):
            hw = 512 * 512 if c != 19 else 1024 * 2048
            cfg = tile_config(c, hw, cl)
            out.append(dict(
                name=f"confusion_matrix[C={c},{dt},{'NHWC' if cl else 'NCHW'}]",
                fn=confusion_matrix_kernel_rows if cfg.rows else confusion_matrix_kernel,
                signature={"x_ptr": f"*{dt}", "target_ptr": "*i64", "out_ptr": "*i64",
                           "HW": "i32", "ignore_index": "i32"},
                constexprs=dict(NUM_CLASSES=c, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
                                TILES=cfg.tiles, CHANNELS_LAST=cl, FROM_LOGITS=True,
                                **hist_constexprs(c)),
                divisible=("x_ptr", "target_ptr", "out_ptr") + (() if cfg.rows else ("HW",)),
                num_warps=cfg.num_warps))
        out.append(dict(
            name="confusion_matrix[C=21,pred u8]", fn=confusion_matrix_kernel,
            signature={"x_ptr": "*u8", "target_ptr": "*u8", "out_ptr": "*i64", "HW": "i32",
                       "ignore_index": "i32"},
            constexprs=dict(NUM_CLASSES=21, BLOCK_C=1, BLOCK_P=PRED_BLOCK_P,
                            TILES=4096 // PRED_BLOCK_P, CHANNELS_LAST=False, FROM_LOGITS=False,
                            **hist_constexprs(21)),
            divisible=("x_ptr", "target_ptr", "out_ptr", "HW"), num_warps=PRED_WARPS))
        return out
