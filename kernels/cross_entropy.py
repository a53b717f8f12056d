"""Cross-entropy with ignore_index, mean over the non-ignored pixels counted on the device.

``cross_entropy_reference`` is the eager reference every other backend is tested against.
An all-ignored batch gives loss 0 and zero gradient (not NaN): the count is clamped to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor,
                            ignore_index: int = 255) -> torch.Tensor:
    """Mean CE over pixels whose target != ignore_index. logits (N,C,H,W), target (N,H,W)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    total = F.cross_entropy(x, target.long(), ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum()
    # clamp keeps the all-ignored case at 0 / 1 = 0 without a host-side branch.
    return (total / count.clamp_min(1).to(total.dtype)).to(logits.dtype)


# ============================================================================== Triton
# Fused forward + gradient: one read of the logits, one write of the gradient.
#
# Bytes per pixel (es = element size of the logits dtype):
#   read  C*es (logits) + target (1..8 B)      write C*es (gradient)
#   -> VOC 16x21x512^2 bf16: 4.19 M px * (42 + 42 + 1) B = 357 MB per forward;
#   the backward (scale_grad) reads and writes the gradient once more: + 2*C*es per pixel.
# The partial sums are one fp32 + one int32 per program (G programs), reduced by
# finalize_mean in a fixed order (deterministic, no float atomics, no host sync).
from ._common import (AOT_VARIANTS, HAVE_TRITON, check_logits, check_runnable,  # noqa: E402
                      define_op, empty_like_prepared, finalize_aot_spec, finalize_mean,
                      prepare_logits, rows_variant, scale_grad, tile_config)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import load_logits_tile, pick, softmax_stats

    @triton.jit
    def cross_entropy_fwd_kernel(logits_ptr, target_ptr, grad_ptr, sum_part_ptr, cnt_part_ptr,
                                 HW, ignore_index,
                                 NUM_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr,
                                 BLOCK_P: tl.constexpr, TILES: tl.constexpr,
                                 CHANNELS_LAST: tl.constexpr, WRITE_GRAD: tl.constexpr = True):
        """Grid (cdiv(HW, BLOCK_P*TILES), N). Per pixel: ce = logsumexp(x) - x[t] and the
        unnormalised gradient (softmax(x) - onehot(t)) * valid; per program: sum(ce * valid)
        and the number of valid pixels. Targets outside [0, C) are treated as ignored (never
        used as an address)."""
        pid_s = tl.program_id(0)
        n = tl.program_id(1)
        img = n.to(tl.int64) * HW * NUM_CLASSES      # 64-bit image base, 32-bit in-image offsets
        x_img = logits_ptr + img
        g_img = grad_ptr + img
        t_img = target_ptr + n.to(tl.int64) * HW
        c_offs = tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_P], dtype=tl.int32)
        for i in range(TILES):
            s_offs = (pid_s * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
            x, offs, mask = load_logits_tile(x_img, s_offs, HW, NUM_CLASSES, BLOCK_C,
                                             CHANNELS_LAST)
            t = tl.load(t_img + s_offs, mask=s_offs < HW, other=0).to(tl.int64)
            valid = (s_offs < HW) & (t != ignore_index) & (t >= 0) & (t < NUM_CLASSES)
            t = tl.where(valid, t, 0).to(tl.int32)
            m, am, e, ssum = softmax_stats(x, BLOCK_C)
            ce = tl.log(ssum) + m - pick(x, t, BLOCK_C)
            acc += tl.where(valid, ce, 0.0)
            cnt += valid.to(tl.int32)
            if WRITE_GRAD:   # off when no input needs a gradient: half the traffic
                g = e * (1.0 / ssum)[:, None] - (c_offs[None, :] == t[:, None]).to(tl.float32)
                g = tl.where(valid[:, None], g, 0.0)
                tl.store(g_img + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        pid = n * tl.num_programs(0) + pid_s
        tl.store(sum_part_ptr + pid, tl.sum(acc, axis=0))
        tl.store(cnt_part_ptr + pid, tl.sum(cnt, axis=0))

    cross_entropy_fwd_kernel_rows = rows_variant(cross_entropy_fwd_kernel)

    def _ce_impl(logits, target, ignore_index, write_grad=True, block_p=None, tiles=None,
                 num_warps=None):
        """(loss, unnormalised gradient, 1/count). block_p / tiles / num_warps override the
        launch shape (tests check every block size; benchmarks/kernels.py --sweep)."""
        check_runnable("cross_entropy", logits, target)
        check_logits("cross_entropy", logits)
        x, cl = prepare_logits(logits)
        n, c, h, w = x.shape
        hw = h * w
        t = target.contiguous()
        grad = empty_like_prepared(logits) if write_grad else logits.new_empty(0)
        cfg = tile_config(c, hw, cl, 1, block_p, tiles, num_warps)
        kernel = cross_entropy_fwd_kernel_rows if cfg.rows else cross_entropy_fwd_kernel
        g0 = triton.cdiv(hw, cfg.block_p * cfg.tiles) if hw > 0 else 0
        # every program writes its own slot: no memset needed (one launch fewer)
        sum_part = torch.empty(max(1, g0 * n), dtype=torch.float32, device=x.device)
        cnt_part = torch.empty(max(1, g0 * n), dtype=torch.int32, device=x.device)
        if g0 * n > 0:
            kernel[(g0, n)](
                x, t, grad, sum_part, cnt_part, hw, ignore_index,
                NUM_CLASSES=c, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, TILES=cfg.tiles,
                CHANNELS_LAST=cl, WRITE_GRAD=write_grad, num_warps=cfg.num_warps)
        loss, inv = finalize_mean(sum_part, cnt_part, logits.dtype)
        return loss, grad, inv

    def _ce_fake(logits, target, ignore_index, write_grad):
        return (logits.new_empty(()),
                empty_like_prepared(logits) if write_grad else logits.new_empty(0),
                logits.new_empty((), dtype=torch.float32))

    def _ce_setup(ctx, inputs, output):
        _, grad, inv = output
        ctx.save_for_backward(grad, inv)
        ctx.mark_non_differentiable(grad, inv)
        # The stored gradient and 1/count get no gradient: without this autograd would
        # hand backward a zero tensor the size of the logits for the first (a wasted
        # allocation and memset of hundreds of MB a step at the VOC shape).
        ctx.set_materialize_grads(False)

    def _ce_backward(ctx, g_loss, g_grad, g_inv):
        if g_loss is None:   # the loss itself reached nothing that needs a gradient
            return None, None, None, None
        grad, inv = ctx.saved_tensors
        return scale_grad(grad, g_loss, inv), None, None, None

    cross_entropy_op = define_op(
        "cps_fast::cross_entropy_triton",
        "(Tensor logits, Tensor target, int ignore_index, bool write_grad) "
        "-> (Tensor, Tensor, Tensor)",
        lambda logits, target, ignore_index, write_grad: _ce_impl(logits, target,
                                                                  ignore_index, write_grad),
        _ce_fake, _ce_backward, _ce_setup)

    def cross_entropy_triton(logits: torch.Tensor, target: torch.Tensor,
                             ignore_index: int = 255) -> torch.Tensor:
        """Mean CE over non-ignored pixels (0 when none), differentiable in logits.

        Outputs of the op: (loss, stored gradient, 1/count); only the loss is returned. The
        gradient is written only when autograd will need it (write_grad)."""
        write_grad = torch.is_grad_enabled() and logits.requires_grad
        return cross_entropy_op(logits, target, ignore_index, write_grad)[0]

    def aot_specs():
        """Kernels and real-shape constexprs for the ahead-of-time compile test
        (tests/kernels/aot_compile.py): VOC (C=21) and Cityscapes (C=19), both layouts."""
        out = []
        for c, dt, cl in AOT_VARIANTS:
            cfg = tile_config(c, 512 * 512, cl)
            out.append(dict(
                name=f"cross_entropy_fwd[C={c},{dt},{'NHWC' if cl else 'NCHW'}]",
                fn=cross_entropy_fwd_kernel_rows if cfg.rows else cross_entropy_fwd_kernel,
                signature={"logits_ptr": f"*{dt}", "target_ptr": "*u8", "grad_ptr": f"*{dt}",
                           "sum_part_ptr": "*fp32", "cnt_part_ptr": "*i32", "HW": "i32",
                           "ignore_index": "i32"},
                constexprs=dict(NUM_CLASSES=c, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
                                TILES=cfg.tiles, CHANNELS_LAST=cl, WRITE_GRAD=True),
                divisible=("logits_ptr", "target_ptr", "grad_ptr", "sum_part_ptr",
                           "cnt_part_ptr") + (() if cfg.rows else ("HW",)),
                num_warps=cfg.num_warps))
        out.append(finalize_aot_spec())
        return out
