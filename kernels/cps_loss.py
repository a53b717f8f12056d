"""The CPS loss: each network's argmax is the hard pseudo-label of the other's cross-entropy.

loss = CE(a, argmax b) + CE(b, argmax a), mean over valid pixels (all pixels when ``valid``
is None), no gradient through the argmax (ties go to the lowest class index, as
``torch.argmax``). ``stats`` is an int64 device tensor of four counts,
``[agree_labeled, total_labeled, agree_unlabeled, total_unlabeled]``: among valid pixels
where at least one network predicts a class other than ``background_index`` (all valid
pixels when it is None), how many predictions agree. agree/total is the overlap ratio of the
supplementary's Figure 1; it stays on the device until logged.
"""

from __future__ import annotations

from typing import Optional

import torch

STATS_FIELDS = ("agree_labeled", "total_labeled", "agree_unlabeled", "total_unlabeled")


def agreement_stats(pred_a: torch.Tensor, pred_b: torch.Tensor, valid: Optional[torch.Tensor],
                    is_labeled: Optional[torch.Tensor], background_index: Optional[int]):
    """The four agreement counts (int64, shape (4,)) from two argmax maps (N,H,W)."""
    counted = torch.ones_like(pred_a, dtype=torch.bool) if valid is None else valid.bool()
    if background_index is not None:
        counted = counted & ((pred_a != background_index) | (pred_b != background_index))
    agree = counted & (pred_a == pred_b)
    n = pred_a.shape[0]
    lab = (torch.zeros(n, dtype=torch.bool, device=pred_a.device) if is_labeled is None
           else is_labeled.to(device=pred_a.device, dtype=torch.bool))
    agree_i = agree.reshape(n, -1).sum(1)
    total_i = counted.reshape(n, -1).sum(1)
    return torch.stack([
        (agree_i * lab).sum(), (total_i * lab).sum(),
        (agree_i * ~lab).sum(), (total_i * ~lab).sum(),
    ]).to(torch.int64)


def cps_loss_reference(logits_a: torch.Tensor, logits_b: torch.Tensor,
                       valid: Optional[torch.Tensor] = None,
                       is_labeled: Optional[torch.Tensor] = None,
                       background_index: Optional[int] = 0):
    """(loss 0-dim, stats int64 (4,)). logits (N,C,H,W) each; valid (N,H,W) bool; is_labeled (N,)."""
    a = logits_a if logits_a.dtype == torch.float64 else logits_a.float()
    b = logits_b if logits_b.dtype == torch.float64 else logits_b.float()
    pred_a = a.detach().argmax(1)
    pred_b = b.detach().argmax(1)
    ce_a = torch.logsumexp(a, 1) - a.gather(1, pred_b.unsqueeze(1)).squeeze(1)
    ce_b = torch.logsumexp(b, 1) - b.gather(1, pred_a.unsqueeze(1)).squeeze(1)
    per_pixel = ce_a + ce_b
    if valid is None:
        loss = per_pixel.mean()
    else:
        v = valid.bool()
        count = v.sum().clamp_min(1).to(per_pixel.dtype)
        loss = torch.where(v, per_pixel, torch.zeros_like(per_pixel)).sum() / count
    stats = agreement_stats(pred_a, pred_b, valid, is_labeled, background_index)
    return loss.to(logits_a.dtype), stats


# ============================================================================== Triton
# One pass over both networks' logits: both argmaxes, both CEs against the other network's
# argmax, both (unnormalised) gradients, per-program partial loss sums and agreement counts.
#
# Bytes per pixel (es = element size): read 2*C*es (a, b) + 1 (valid, optional);
# write 2*C*es (grad_a, grad_b). VOC (2 x 16x21x512^2, bf16): 4.19 M px * (84 + 84 + 1) B
# = 709 MB per forward, i.e. ~0.21 ms at 3.35 TB/s; the backward (scale_grad) moves the two
# gradients once more (+ 4*C*es per pixel). Counts and partial sums are per program (no
# atomics at all): one fp32 + three int32 per program, added by a one-program finaliser in
# a fixed order, which also splits the agreement counts by is_labeled[image].
from ._common import (AOT_VARIANTS, FINALIZE_BLOCK, FINALIZE_WARPS, HAVE_TRITON,  # noqa: E402
                      as_u8, check_logits, check_runnable, define_op, empty_like_prepared,
                      prepare_logits, rows_variant, scale_grad, tile_config)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import load_logits_tile, pick, softmax_stats

    @triton.jit
    def cps_loss_fwd_kernel(a_ptr, b_ptr, valid_ptr, grad_a_ptr, grad_b_ptr,
                            sum_part_ptr, int_part_ptr, HW, G, background_index,
                            NUM_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_P: tl.constexpr, TILES: tl.constexpr,
                            A_CHANNELS_LAST: tl.constexpr, B_CHANNELS_LAST: tl.constexpr,
                            HAS_VALID: tl.constexpr, HAS_BG: tl.constexpr,
                            WRITE_GRAD: tl.constexpr = True):
        """Grid (cdiv(HW, BLOCK_P*TILES), N); G = total programs.

        int_part rows: [0] valid pixels, [1] agreeing counted pixels, [2] counted pixels
        (counted = valid and at least one argmax is not the background class)."""
        pid_s = tl.program_id(0)
        n = tl.program_id(1)
        img = n.to(tl.int64) * HW * NUM_CLASSES
        c_offs = tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_P], dtype=tl.int32)
        agree = tl.zeros([BLOCK_P], dtype=tl.int32)
        total = tl.zeros([BLOCK_P], dtype=tl.int32)
        for i in range(TILES):
            s_offs = (pid_s * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = s_offs < HW
            if HAS_VALID:
                v = tl.load(valid_ptr + n.to(tl.int64) * HW + s_offs, mask=pmask, other=0)
                v = (v != 0) & pmask
            else:
                v = pmask
            xa, offs_a, mask_a = load_logits_tile(a_ptr + img, s_offs, HW, NUM_CLASSES,
                                                  BLOCK_C, A_CHANNELS_LAST)
            xb, offs_b, mask_b = load_logits_tile(b_ptr + img, s_offs, HW, NUM_CLASSES,
                                                  BLOCK_C, B_CHANNELS_LAST)
            ma, pa, ea, sa = softmax_stats(xa, BLOCK_C)
            mb, pb, eb, sb = softmax_stats(xb, BLOCK_C)
            # CE(a, argmax b) + CE(b, argmax a); pick() never dereferences the index
            ce = ((tl.log(sa) + ma - pick(xa, pb, BLOCK_C))
                  + (tl.log(sb) + mb - pick(xb, pa, BLOCK_C)))
            acc += tl.where(v, ce, 0.0)
            cnt += v.to(tl.int32)
            if WRITE_GRAD:   # off when no input needs a gradient: half the traffic
                ga = ea * (1.0 / sa)[:, None] - (c_offs[None, :] == pb[:, None]).to(tl.float32)
                ga = tl.where(v[:, None], ga, 0.0)
                tl.store(grad_a_ptr + img + offs_a, ga.to(grad_a_ptr.dtype.element_ty),
                         mask=mask_a)
                gb = eb * (1.0 / sb)[:, None] - (c_offs[None, :] == pa[:, None]).to(tl.float32)
                gb = tl.where(v[:, None], gb, 0.0)
                tl.store(grad_b_ptr + img + offs_b, gb.to(grad_b_ptr.dtype.element_ty),
                         mask=mask_b)
            if HAS_BG:
                counted = v & ((pa != background_index) | (pb != background_index))
            else:
                counted = v
            agree += (counted & (pa == pb)).to(tl.int32)
            total += counted.to(tl.int32)
        pid = n * tl.num_programs(0) + pid_s
        tl.store(sum_part_ptr + pid, tl.sum(acc, axis=0))
        tl.store(int_part_ptr + pid, tl.sum(cnt, axis=0))
        tl.store(int_part_ptr + G + pid, tl.sum(agree, axis=0))
        tl.store(int_part_ptr + 2 * G + pid, tl.sum(total, axis=0))

    @triton.jit
    def cps_loss_finalize_kernel(sum_part_ptr, int_part_ptr, G, G0, is_labeled_ptr,
                                 loss_ptr, inv_count_ptr, stats_ptr,
                                 HAS_LABELED: tl.constexpr, BLOCK: tl.constexpr):
        """One program, fixed summation order: loss, 1/count and the four stats (int64).
        Program pid belongs to image pid // G0 (G0 = pixel blocks per image)."""
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        cnt = tl.zeros([BLOCK], dtype=tl.int64)
        ag_l = tl.zeros([BLOCK], dtype=tl.int64)
        to_l = tl.zeros([BLOCK], dtype=tl.int64)
        ag_u = tl.zeros([BLOCK], dtype=tl.int64)
        to_u = tl.zeros([BLOCK], dtype=tl.int64)
        for start in range(0, G, BLOCK):
            idx = start + offs
            m = idx < G
            acc += tl.load(sum_part_ptr + idx, mask=m, other=0.0)
            cnt += tl.load(int_part_ptr + idx, mask=m, other=0).to(tl.int64)
            ag = tl.load(int_part_ptr + G + idx, mask=m, other=0).to(tl.int64)
            to = tl.load(int_part_ptr + 2 * G + idx, mask=m, other=0).to(tl.int64)
            if HAS_LABELED:
                lab = tl.load(is_labeled_ptr + idx // G0, mask=m, other=0) != 0
            else:
                lab = idx < 0          # all False: every image counts as unlabeled
            ag_l += tl.where(lab, ag, 0)
            to_l += tl.where(lab, to, 0)
            ag_u += tl.where(lab, 0, ag)
            to_u += tl.where(lab, 0, to)
        count = tl.maximum(tl.sum(cnt, axis=0).to(tl.float32), 1.0)
        inv = 1.0 / count
        tl.store(loss_ptr, (tl.sum(acc, axis=0) * inv).to(loss_ptr.dtype.element_ty))
        tl.store(inv_count_ptr, inv)
        tl.store(stats_ptr + 0, tl.sum(ag_l, axis=0))
        tl.store(stats_ptr + 1, tl.sum(to_l, axis=0))
        tl.store(stats_ptr + 2, tl.sum(ag_u, axis=0))
        tl.store(stats_ptr + 3, tl.sum(to_u, axis=0))

    cps_loss_fwd_kernel_rows = rows_variant(cps_loss_fwd_kernel)

    def _cps_impl(logits_a, logits_b, valid, is_labeled, background_index, write_grad=True,
                  block_p=None, tiles=None, num_warps=None):
        """(loss, stats, unnormalised grad_a, grad_b, 1/count); block_p / tiles / num_warps
        override the launch shape (tests, benchmarks/kernels.py --sweep)."""
        check_runnable("cps_loss", logits_a, logits_b, *([valid] if valid is not None else []))
        check_logits("cps_loss", logits_a)
        check_logits("cps_loss", logits_b)
        if logits_a.shape != logits_b.shape or logits_a.dtype != logits_b.dtype:
            raise ValueError(f"cps_loss: logits_a {logits_a.dtype} {tuple(logits_a.shape)} and "
                             f"logits_b {logits_b.dtype} {tuple(logits_b.shape)} must match")
        a, cl_a = prepare_logits(logits_a)
        b, cl_b = prepare_logits(logits_b)
        n, c, h, w = a.shape
        hw = h * w
        dev = a.device
        if valid is not None and tuple(valid.shape) != (n, h, w):
            raise ValueError(f"cps_loss: valid shape {tuple(valid.shape)} != {(n, h, w)}")
        if is_labeled is not None and tuple(is_labeled.shape) != (n,):
            raise ValueError(f"cps_loss: is_labeled shape {tuple(is_labeled.shape)} != {(n,)}")
        v = as_u8(valid) if valid is not None else None
        # is_labeled may live on the host (a per-batch flag): moved, not rejected; a
        # pageable host-to-device copy is staged, it does not wait for the device
        lab = as_u8(is_labeled.to(dev, non_blocking=True)) if is_labeled is not None else None
        grad_a = empty_like_prepared(logits_a) if write_grad else a.new_empty(0)
        grad_b = empty_like_prepared(logits_b) if write_grad else a.new_empty(0)
        # a mixed pair (one channels_last) takes the channels_last tile shape
        cfg = tile_config(c, hw, cl_a or cl_b, 2, block_p, tiles, num_warps)
        kernel = cps_loss_fwd_kernel_rows if cfg.rows else cps_loss_fwd_kernel
        g0 = triton.cdiv(hw, cfg.block_p * cfg.tiles) if hw > 0 else 0
        g = g0 * n
        # every program writes its own slots: no memset needed (one launch fewer)
        sum_part = torch.empty(max(g, 1), dtype=torch.float32, device=dev)
        int_part = torch.empty(3 * max(g, 1), dtype=torch.int32, device=dev)
        if g > 0:
            kernel[(g0, n)](
                a, b, v if v is not None else sum_part, grad_a, grad_b, sum_part, int_part,
                hw, g, background_index if background_index >= 0 else 0,
                NUM_CLASSES=c, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, TILES=cfg.tiles,
                A_CHANNELS_LAST=cl_a, B_CHANNELS_LAST=cl_b, HAS_VALID=v is not None,
                HAS_BG=background_index >= 0, WRITE_GRAD=write_grad,
                num_warps=cfg.num_warps)
        loss = torch.empty((), dtype=logits_a.dtype, device=dev)
        inv = torch.empty((), dtype=torch.float32, device=dev)
        stats = torch.empty(4, dtype=torch.int64, device=dev)
        cps_loss_finalize_kernel[(1,)](
            sum_part, int_part, g, max(g0, 1), lab if lab is not None else int_part,
            loss, inv, stats, HAS_LABELED=lab is not None, BLOCK=FINALIZE_BLOCK,
            num_warps=FINALIZE_WARPS)
        return loss, stats, grad_a, grad_b, inv

    def _cps_fake(logits_a, logits_b, valid, is_labeled, background_index, write_grad):
        return (logits_a.new_empty(()), logits_a.new_empty(4, dtype=torch.int64),
                empty_like_prepared(logits_a) if write_grad else logits_a.new_empty(0),
                empty_like_prepared(logits_b) if write_grad else logits_a.new_empty(0),
                logits_a.new_empty((), dtype=torch.float32))

    def _cps_setup(ctx, inputs, output):
        _, stats, grad_a, grad_b, inv = output
        ctx.save_for_backward(grad_a, grad_b, inv)
        ctx.mark_non_differentiable(stats, grad_a, grad_b, inv)
        # No zero gradients materialised for the stats, the two stored gradients and
        # 1/count (two logits-sized allocations and memsets a step otherwise).
        ctx.set_materialize_grads(False)

    def _cps_backward(ctx, g_loss, g_stats, g_ga, g_gb, g_inv):
        if g_loss is None:   # the loss itself reached nothing that needs a gradient
            return None, None, None, None, None, None
        grad_a, grad_b, inv = ctx.saved_tensors
        ga = scale_grad(grad_a, g_loss, inv) if ctx.needs_input_grad[0] else None
        gb = scale_grad(grad_b, g_loss, inv) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None, None, None

    cps_loss_op = define_op(
        "cps_fast::cps_loss_triton",
        "(Tensor logits_a, Tensor logits_b, Tensor? valid, Tensor? is_labeled, "
        "int background_index, bool write_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        lambda a, b, valid, is_labeled, background_index, write_grad: _cps_impl(
            a, b, valid, is_labeled, background_index, write_grad),
        _cps_fake, _cps_backward, _cps_setup)

    def cps_loss_triton(logits_a: torch.Tensor, logits_b: torch.Tensor,
                        valid: Optional[torch.Tensor] = None,
                        is_labeled: Optional[torch.Tensor] = None,
                        background_index: Optional[int] = 0):
        """(loss, stats) like :func:`cps_loss_reference`; differentiable in both logits.

        The op's outputs are (loss, stats, grad_a, grad_b, 1/count); the gradients are the
        unnormalised ones the forward wrote, scaled by grad_output/count in the backward."""
        bg = -1 if background_index is None else int(background_index)
        if background_index is not None and bg < 0:
            raise ValueError(f"cps_loss: background_index {background_index} must be >= 0 or None")
        # the gradients are written only when autograd will need them (e.g. not for a
        # validation-time loss under torch.no_grad)
        write_grad = torch.is_grad_enabled() and (logits_a.requires_grad
                                                  or logits_b.requires_grad)
        out = cps_loss_op(logits_a, logits_b, valid, is_labeled, bg, write_grad)
        return out[0], out[1]

    def aot_specs():
        out = []
        for c, dt, cl in AOT_VARIANTS:
            cfg = tile_config(c, 512 * 512, cl, 2)
            out.append(dict(
                name=f"cps_loss_fwd[C={c},{dt},{'NHWC' if cl else 'NCHW'}]",
                fn=cps_loss_fwd_kernel_rows if cfg.rows else cps_loss_fwd_kernel,
                signature={"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "valid_ptr": "*u8",
                           "grad_a_ptr": f"*{dt}", "grad_b_ptr": f"*{dt}",
                           "sum_part_ptr": "*fp32", "int_part_ptr": "*i32", "HW": "i32",
                           "G": "i32", "background_index": "i32"},
                constexprs=dict(NUM_CLASSES=c, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
                                TILES=cfg.tiles, A_CHANNELS_LAST=cl, B_CHANNELS_LAST=cl,
                                HAS_VALID=True, HAS_BG=True, WRITE_GRAD=True),
                divisible=("a_ptr", "b_ptr", "valid_ptr", "grad_a_ptr", "grad_b_ptr",
                           "sum_part_ptr", "int_part_ptr", "G") + (() if cfg.rows else ("HW",)),
                num_warps=cfg.num_warps))
        out.append(dict(
            name="cps_loss_finalize", fn=cps_loss_finalize_kernel,
            signature={"sum_part_ptr": "*fp32", "int_part_ptr": "*i32", "G": "i32", "G0": "i32",
                       "is_labeled_ptr": "*u8", "loss_ptr": "*bf16", "inv_count_ptr": "*fp32",
                       "stats_ptr": "*i64"},
            constexprs=dict(HAS_LABELED=True, BLOCK=FINALIZE_BLOCK),
            divisible=("sum_part_ptr", "int_part_ptr", "is_labeled_ptr", "stats_ptr"),
            num_warps=FINALIZE_WARPS))
        return out
