"""OHEM cross-entropy with the official CPS ``ProbOhemCrossEntropy2d`` semantics.

p = softmax probability of the target class at each valid pixel. If num_valid > min_kept,
t = the min_kept-th smallest p, threshold = max(t, thresh), and the loss is the mean CE over
valid pixels with p <= threshold; otherwise (and when min_kept <= 0) every valid pixel is
kept. The reference finds t with ``torch.kthvalue`` over a tensor whose invalid entries are
pushed above every probability, so that no host synchronisation and no data-dependent
shape is needed.
"""

from __future__ import annotations

import torch


def ohem_per_pixel(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """Per-pixel (ce, p_target, valid), flattened, computed in at least fp32."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    valid = target != ignore_index
    safe_t = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
    logp = torch.log_softmax(x, dim=1).gather(1, safe_t.unsqueeze(1)).squeeze(1)
    return (-logp).reshape(-1), logp.detach().exp().reshape(-1), valid.reshape(-1)


def ohem_threshold(p: torch.Tensor, valid: torch.Tensor, thresh: float, min_kept: int):
    """The probability threshold (0-dim tensor) of the OHEM rule; +inf keeps every valid pixel."""
    num_valid = valid.sum()
    inf = torch.full((), float("inf"), dtype=p.dtype, device=p.device)
    if min_kept <= 0 or min_kept > p.numel():
        # Fewer pixels than min_kept in the whole batch: every valid pixel is always kept.
        # min_kept <= 0 switches the hard-example mining off, as in the official code (its
        # kept mask is applied only under ``if self.min_kept > 0``): every valid pixel kept.
        return inf
    # Invalid pixels are pushed to 2 (above any probability) so the k-th smallest is a valid
    # pixel's p whenever num_valid >= min_kept.
    kth = torch.kthvalue(torch.where(valid, p, torch.full_like(p, 2.0)), min_kept).values
    t = torch.clamp_min(kth, thresh)
    return torch.where(num_valid > min_kept, t, inf)


def ohem_cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor,
                                 thresh: float = 0.7, min_kept: int = 50000,
                                 ignore_index: int = 255) -> torch.Tensor:
    """OHEM CE (mean over kept pixels, 0 when none). logits (N,C,H,W), target (N,H,W)."""
    ce, p, valid = ohem_per_pixel(logits, target, ignore_index)
    threshold = ohem_threshold(p, valid, thresh, min_kept)
    kept = valid & (p <= threshold)
    count = kept.sum().clamp_min(1).to(ce.dtype)
    return (torch.where(kept, ce, torch.zeros_like(ce)).sum() / count).to(logits.dtype)


# ============================================================================== Triton
# Forward, all on the device with data-independent launch shapes (no sort, no host sync):
#   1. ohem_pass1_kernel   per pixel: p = softmax(x)[t], ce = -log p (as lse - x_t), the key
#      (bits of p, -1 when not valid), and the histogram of the key's top 10 bits.
#   2. radix selection of the min_kept-th smallest key among the valid pixels: p is in
#      [0, 1], so its fp32 bits are a monotonic unsigned integer below 2**30 and three
#      10-bit digits [29:20] [19:10] [9:0] determine it. After each histogram a one-program
#      ohem_select_kernel scans the 1024 bins (cumsum), finds the bin holding the k-th key
#      and writes (prefix, k within that bin) to device memory; ohem_hist_kernel then
#      histograms the next digit of the keys that share the prefix. The last select turns
#      the key back into t and writes threshold = max(t, thresh) if num_valid > min_kept
#      else +inf (num_valid = the sum of the first histogram).
#   3. ohem_loss_kernel: per-program sum of ce and count over kept = valid & p <= threshold
#      (the same fp32 bits the selection used), finalize_mean: the mean and 1/count.
# Backward: ohem_bwd_kernel recomputes softmax from the logits and writes
# (softmax - onehot) * kept * grad_out / count directly. Writing an unnormalised gradient
# in the forward would cost an extra write + read of C*es bytes per pixel (the kept mask is
# only known after the selection, and grad_output only in the backward), so here the
# recompute is the cheapest schedule: 3*C*es bytes per pixel for forward + backward.
#
# Bytes per pixel (es = element size): pass 1 reads C*es + target, writes 8 (key, ce);
# two histogram passes read 4 each; the loss pass reads 8; backward reads C*es + target +
# 4 (key) and writes C*es. Cityscapes 16x19x800^2 bf16: 10.24 M px * (3*38 + 2 + 28) B
# = 1.47 GB for forward + backward.
from ._common import (AOT_VARIANTS, HAVE_TRITON, INT32_MAX, check_logits,  # noqa: E402
                      check_runnable, define_op, empty_like_prepared, finalize_aot_spec,
                      finalize_mean, prepare_logits, rows_variant, tile_config)

RADIX_BITS = 10
NBINS = 1 << RADIX_BITS        # 1024 real bins per digit
HIST_BINS = 2 * NBINS          # tl.histogram domain: bin NBINS collects "not counted" keys

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import load_logits_tile, pick, softmax_stats

    RADIX_BITS_C = tl.constexpr(RADIX_BITS)   # a global read inside @triton.jit must be constexpr

    @triton.jit
    def ohem_pass1_kernel(logits_ptr, target_ptr, key_ptr, ce_ptr, hist_ptr, HW, ignore_index,
                          NUM_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_P: tl.constexpr, TILES: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr,
                          NBINS: tl.constexpr, HIST_BINS: tl.constexpr):
        """Grid (cdiv(HW, BLOCK_P*TILES), N): per-pixel key and ce, and hist[0] of key >> 20.

        The program's histogram is accumulated in registers over its tiles and added to the
        global one with integer atomics on the non-empty bins only (deterministic)."""
        pid_s = tl.program_id(0)
        n = tl.program_id(1)
        img = n.to(tl.int64) * HW * NUM_CLASSES
        pix = n.to(tl.int64) * HW
        hist = tl.zeros([HIST_BINS], dtype=tl.int32)
        for i in range(TILES):
            s_offs = (pid_s * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = s_offs < HW
            x, offs, mask = load_logits_tile(logits_ptr + img, s_offs, HW, NUM_CLASSES,
                                             BLOCK_C, CHANNELS_LAST)
            t = tl.load(target_ptr + pix + s_offs, mask=pmask, other=0).to(tl.int64)
            valid = pmask & (t != ignore_index) & (t >= 0) & (t < NUM_CLASSES)
            t = tl.where(valid, t, 0).to(tl.int32)
            m, am, e, ssum = softmax_stats(x, BLOCK_C)
            logp = pick(x, t, BLOCK_C) - m - tl.log(ssum)      # log_softmax(x)[t] <= 0
            p = tl.exp(logp)
            key = tl.where(valid, p.to(tl.int32, bitcast=True), -1)
            tl.store(key_ptr + pix + s_offs, key, mask=pmask)
            tl.store(ce_ptr + pix + s_offs, tl.where(valid, -logp, 0.0), mask=pmask)
            digit = key >> (2 * RADIX_BITS_C)
            digit = tl.where(valid & (digit < NBINS) & (digit >= 0), digit, NBINS)
            hist += tl.histogram(digit, HIST_BINS)
        bins = tl.arange(0, HIST_BINS)
        tl.atomic_add(hist_ptr + bins, hist, mask=(bins < NBINS) & (hist > 0))

    @triton.jit
    def ohem_hist_kernel(key_ptr, state_ptr, hist_ptr, numel, PASS: tl.constexpr,
                         BLOCK: tl.constexpr, NBINS: tl.constexpr, HIST_BINS: tl.constexpr):
        """1-D grid over the keys: histogram of digit PASS (1: bits 19..10, 2: bits 9..0) of
        the valid keys whose higher digits equal the prefix chosen so far (state[0])."""
        prefix = tl.load(state_ptr).to(tl.int32)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(key_ptr + offs, mask=offs < numel, other=-1)
        shift = (2 - PASS) * RADIX_BITS_C
        match = (key >= 0) & ((key >> (shift + RADIX_BITS_C)) == prefix)
        digit = tl.where(match, (key >> shift) & (NBINS - 1), NBINS)
        hist = tl.histogram(digit, HIST_BINS)
        bins = tl.arange(0, HIST_BINS)
        tl.atomic_add(hist_ptr + PASS * NBINS + bins, hist, mask=(bins < NBINS) & (hist > 0))

    @triton.jit
    def ohem_select_kernel(hist_ptr, state_ptr, threshold_ptr, min_kept, thresh,
                           PASS: tl.constexpr, NBINS: tl.constexpr):
        """One program: the bin of hist[PASS] holding the k-th smallest key; updates
        state = (prefix, k, num_valid) in device memory; after the last digit writes the
        threshold. When fewer than k keys exist (num_valid < min_kept) the bin is NBINS,
        nothing matches later, and the threshold is +inf anyway."""
        bins = tl.arange(0, NBINS)
        h = tl.load(hist_ptr + PASS * NBINS + bins).to(tl.int64)
        if PASS == 0:
            prefix = tl.zeros([], dtype=tl.int64)
            k = tl.zeros([], dtype=tl.int64) + min_kept
            num_valid = tl.sum(h, axis=0)
        else:
            prefix = tl.load(state_ptr + 0)
            k = tl.load(state_ptr + 1)
            num_valid = tl.load(state_ptr + 2)
        cum = tl.cumsum(h, axis=0)
        b = tl.min(tl.where(cum >= k, bins, NBINS), axis=0).to(tl.int64)
        below = tl.sum(tl.where(bins < b, h, 0), axis=0)
        prefix = prefix * NBINS + b
        if PASS < 2:
            tl.store(state_ptr + 0, prefix)
            tl.store(state_ptr + 1, k - below)
            tl.store(state_ptr + 2, num_valid)
        else:
            t = prefix.to(tl.int32).to(tl.float32, bitcast=True)
            thr = tl.where(num_valid > min_kept, tl.maximum(t, thresh), float("inf"))
            tl.store(threshold_ptr, thr)

    @triton.jit
    def ohem_loss_kernel(key_ptr, ce_ptr, threshold_ptr, sum_part_ptr, cnt_part_ptr, numel,
                         BLOCK: tl.constexpr):
        """Per-program sum of ce and count over kept pixels (valid and p <= threshold)."""
        thr = tl.load(threshold_ptr)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        key = tl.load(key_ptr + offs, mask=m, other=-1)
        ce = tl.load(ce_ptr + offs, mask=m, other=0.0)
        kept = (key >= 0) & (key.to(tl.float32, bitcast=True) <= thr)
        tl.store(sum_part_ptr + tl.program_id(0), tl.sum(tl.where(kept, ce, 0.0), axis=0))
        tl.store(cnt_part_ptr + tl.program_id(0), tl.sum(kept.to(tl.int32), axis=0))

    @triton.jit
    def ohem_bwd_kernel(logits_ptr, target_ptr, key_ptr, threshold_ptr, grad_out_ptr,
                        inv_count_ptr, grad_ptr, HW,
                        NUM_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_P: tl.constexpr, TILES: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr):
        """grad = (softmax(x) - onehot(t)) * kept * grad_out / count, straight from the
        logits; kept uses the stored keys (-1 where not valid), so it is exactly the
        forward's kept set and the target is only read as a class (clamped, never an
        address)."""
        pid_s = tl.program_id(0)
        n = tl.program_id(1)
        img = n.to(tl.int64) * HW * NUM_CLASSES
        pix = n.to(tl.int64) * HW
        c_offs = tl.arange(0, BLOCK_C)
        thr = tl.load(threshold_ptr)
        scale = tl.load(grad_out_ptr).to(tl.float32) * tl.load(inv_count_ptr)
        for i in range(TILES):
            s_offs = (pid_s * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = s_offs < HW
            x, offs, mask = load_logits_tile(logits_ptr + img, s_offs, HW, NUM_CLASSES,
                                             BLOCK_C, CHANNELS_LAST)
            t = tl.load(target_ptr + pix + s_offs, mask=pmask, other=0).to(tl.int64)
            t = tl.where((t >= 0) & (t < NUM_CLASSES), t, 0).to(tl.int32)
            key = tl.load(key_ptr + pix + s_offs, mask=pmask, other=-1)
            kept = (key >= 0) & (key.to(tl.float32, bitcast=True) <= thr)
            m, am, e, ssum = softmax_stats(x, BLOCK_C)
            g = e * (1.0 / ssum)[:, None] - (c_offs[None, :] == t[:, None]).to(tl.float32)
            g = tl.where(kept[:, None], g * scale, 0.0)
            tl.store(grad_ptr + img + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)

    ohem_pass1_kernel_rows = rows_variant(ohem_pass1_kernel)
    ohem_bwd_kernel_rows = rows_variant(ohem_bwd_kernel)
    HIST_BLOCK = 4096      # keys per histogram program (16 KB read, <= 1024 atomics)
    LOSS_BLOCK = 4096

    def _ohem_impl(logits, target, thresh, min_kept, ignore_index, block_p=None, tiles=None,
                   num_warps=None):
        """(loss, key, threshold, 1/count); block_p / tiles / num_warps override the
        per-pixel launch shape (tests, benchmarks/kernels.py --sweep)."""
        check_runnable("ohem_cross_entropy", logits, target)
        check_logits("ohem_cross_entropy", logits)
        x, cl = prepare_logits(logits)
        n, c, h, w = x.shape
        hw = h * w
        numel = n * hw
        if numel > INT32_MAX:
            raise ValueError(f"ohem_cross_entropy: {numel} pixels; the selection kernels index "
                             f"the keys with 32-bit offsets (at most {INT32_MAX})")
        dev = x.device
        t = target.contiguous()
        cfg = tile_config(c, hw, cl, 1, block_p, tiles, num_warps)
        g0 = triton.cdiv(hw, cfg.block_p * cfg.tiles) if hw > 0 else 0
        key = torch.empty((n, h, w), dtype=torch.int32, device=dev)
        ce = torch.empty((n, h, w), dtype=torch.float32, device=dev)
        hist = torch.zeros((3, NBINS), dtype=torch.int32, device=dev)   # atomics add into it
        state = torch.empty(4, dtype=torch.int64, device=dev)   # written by select PASS 0
        if g0 * n > 0:
            kernel = ohem_pass1_kernel_rows if cfg.rows else ohem_pass1_kernel
            kernel[(g0, n)](
                x, t, key, ce, hist, hw, ignore_index, NUM_CLASSES=c, BLOCK_C=cfg.block_c,
                BLOCK_P=cfg.block_p, TILES=cfg.tiles, CHANNELS_LAST=cl, NBINS=NBINS,
                HIST_BINS=HIST_BINS, num_warps=cfg.num_warps)
        if 1 <= min_kept <= numel:
            threshold = torch.empty((), dtype=torch.float32, device=dev)
            gh = triton.cdiv(numel, HIST_BLOCK)
            for pass_ in range(3):
                if pass_ > 0:
                    ohem_hist_kernel[(gh,)](key, state, hist, numel, PASS=pass_,
                                            BLOCK=HIST_BLOCK, NBINS=NBINS,
                                            HIST_BINS=HIST_BINS, num_warps=4)
                ohem_select_kernel[(1,)](hist, state, threshold, min_kept, float(thresh),
                                         PASS=pass_, NBINS=NBINS, num_warps=4)
        else:
            # Static: min_kept <= 0 (mining off) or more than every pixel of the batch.
            threshold = torch.full((), float("inf"), dtype=torch.float32, device=dev)
        gl = max(1, triton.cdiv(numel, LOSS_BLOCK))
        sum_part = torch.zeros(gl, dtype=torch.float32, device=dev)   # numel == 0: read as is
        cnt_part = torch.zeros(gl, dtype=torch.int32, device=dev)
        if numel > 0:
            ohem_loss_kernel[(gl,)](key, ce, threshold, sum_part, cnt_part, numel,
                                    BLOCK=LOSS_BLOCK, num_warps=4)
        loss, inv = finalize_mean(sum_part, cnt_part, logits.dtype)
        return loss, key, threshold, inv

    def _ohem_bwd_impl(grad_out, logits, target, key, threshold, inv_count, ignore_index,
                       block_p=None, tiles=None, num_warps=None):
        x, cl = prepare_logits(logits)
        n, c, h, w = x.shape
        hw = h * w
        grad = empty_like_prepared(logits)
        cfg = tile_config(c, hw, cl, 1, block_p, tiles, num_warps)
        g0 = triton.cdiv(hw, cfg.block_p * cfg.tiles) if hw > 0 else 0
        if g0 * n > 0:
            kernel = ohem_bwd_kernel_rows if cfg.rows else ohem_bwd_kernel
            kernel[(g0, n)](
                x, target.contiguous(), key, threshold, grad_out.contiguous(), inv_count,
                grad, hw, NUM_CLASSES=c, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
                TILES=cfg.tiles, CHANNELS_LAST=cl, num_warps=cfg.num_warps)
        return grad

    def _ohem_fake(logits, target, thresh, min_kept, ignore_index):
        n, _, h, w = logits.shape
        return (logits.new_empty(()), logits.new_empty((n, h, w), dtype=torch.int32),
                logits.new_empty((), dtype=torch.float32),
                logits.new_empty((), dtype=torch.float32))

    def _ohem_bwd_fake(grad_out, logits, target, key, threshold, inv_count, ignore_index):
        return empty_like_prepared(logits)

    ohem_backward_op = define_op(
        "cps_fast::ohem_cross_entropy_triton_backward",
        "(Tensor grad_out, Tensor logits, Tensor target, Tensor key, Tensor threshold, "
        "Tensor inv_count, int ignore_index) -> Tensor",
        lambda *args: _ohem_bwd_impl(*args), _ohem_bwd_fake)

    def _ohem_setup(ctx, inputs, output):
        logits, target, _, _, ignore_index = inputs
        _, key, threshold, inv = output
        ctx.save_for_backward(logits, target, key, threshold, inv)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(key, threshold, inv)

    def _ohem_backward(ctx, g_loss, g_key, g_thr, g_inv):
        logits, target, key, threshold, inv = ctx.saved_tensors
        grad = ohem_backward_op(g_loss, logits, target, key, threshold, inv, ctx.ignore_index)
        return grad, None, None, None, None

    ohem_cross_entropy_op = define_op(
        "cps_fast::ohem_cross_entropy_triton",
        "(Tensor logits, Tensor target, float thresh, int min_kept, int ignore_index) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        lambda logits, target, thresh, min_kept, ignore_index: _ohem_impl(
            logits, target, thresh, min_kept, ignore_index),
        _ohem_fake, _ohem_backward, _ohem_setup)

    def ohem_cross_entropy_triton(logits: torch.Tensor, target: torch.Tensor,
                                  thresh: float = 0.7, min_kept: int = 50000,
                                  ignore_index: int = 255) -> torch.Tensor:
        """OHEM CE with the reference's semantics; differentiable in logits.

        The op's outputs are (loss, key = bits of p per pixel (-1 where not valid),
        threshold, 1/count); only the loss is returned."""
        return ohem_cross_entropy_op(logits, target, float(thresh), int(min_kept),
                                     int(ignore_index))[0]

    def aot_specs():
        out = []
        for c, dt, cl in AOT_VARIANTS:
            cfg = tile_config(c, 800 * 800, cl)
            lay = "NHWC" if cl else "NCHW"
            common = dict(NUM_CLASSES=c, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
                          TILES=cfg.tiles, CHANNELS_LAST=cl)
            div_hw = ("logits_ptr", "target_ptr") + (() if cfg.rows else ("HW",))
            out.append(dict(
                name=f"ohem_pass1[C={c},{dt},{lay}]",
                fn=ohem_pass1_kernel_rows if cfg.rows else ohem_pass1_kernel,
                signature={"logits_ptr": f"*{dt}", "target_ptr": "*u8", "key_ptr": "*i32",
                           "ce_ptr": "*fp32", "hist_ptr": "*i32", "HW": "i32",
                           "ignore_index": "i32"},
                constexprs=dict(common, NBINS=NBINS, HIST_BINS=HIST_BINS),
                divisible=div_hw + ("key_ptr", "ce_ptr", "hist_ptr"),
                num_warps=cfg.num_warps))
            out.append(dict(
                name=f"ohem_bwd[C={c},{dt},{lay}]",
                fn=ohem_bwd_kernel_rows if cfg.rows else ohem_bwd_kernel,
                signature={"logits_ptr": f"*{dt}", "target_ptr": "*u8", "key_ptr": "*i32",
                           "threshold_ptr": "*fp32", "grad_out_ptr": f"*{dt}",
                           "inv_count_ptr": "*fp32", "grad_ptr": f"*{dt}", "HW": "i32"},
                constexprs=common,
                divisible=div_hw + ("key_ptr", "grad_ptr"),
                num_warps=cfg.num_warps))
        for pass_ in (1, 2):
            out.append(dict(
                name=f"ohem_hist[PASS={pass_}]", fn=ohem_hist_kernel,
                signature={"key_ptr": "*i32", "state_ptr": "*i64", "hist_ptr": "*i32",
                           "numel": "i32"},
                constexprs=dict(PASS=pass_, BLOCK=HIST_BLOCK, NBINS=NBINS, HIST_BINS=HIST_BINS),
                divisible=("key_ptr", "state_ptr", "hist_ptr", "numel"), num_warps=4))
        for pass_ in (0, 1, 2):
            out.append(dict(
                name=f"ohem_select[PASS={pass_}]", fn=ohem_select_kernel,
                signature={"hist_ptr": "*i32", "state_ptr": "*i64", "threshold_ptr": "*fp32",
                           "min_kept": "i32", "thresh": "fp32"},
                constexprs=dict(PASS=pass_, NBINS=NBINS),
                divisible=("hist_ptr", "state_ptr", "threshold_ptr"), num_warps=4))
        out.append(dict(
            name="ohem_loss", fn=ohem_loss_kernel,
            signature={"key_ptr": "*i32", "ce_ptr": "*fp32", "threshold_ptr": "*fp32",
                       "sum_part_ptr": "*fp32", "cnt_part_ptr": "*i32", "numel": "i32"},
            constexprs=dict(BLOCK=LOSS_BLOCK),
            divisible=("key_ptr", "ce_ptr", "threshold_ptr", "sum_part_ptr", "cnt_part_ptr",
                       "numel"), num_warps=4))
        out.append(finalize_aot_spec())
        return out
