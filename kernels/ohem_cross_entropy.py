"""OHEM cross-entropy, selected per image, with the official CPS ``ProbOhemCrossEntropy2d``
rule applied to each image of the batch.

Semantics (every backend: this reference, Triton, the C++ host path and CUDA). For each
image n separately:
  * valid pixels: target != ignore_index; p = softmax probability of the target class;
  * if 0 < min_kept < num_valid_n: t_n = the min_kept-th smallest p among the image's valid
    pixels and threshold_n = max(t_n, thresh); otherwise threshold_n = +inf (every valid
    pixel kept). ``min_kept <= 0`` switches the mining off, as in the official code (its
    kept mask is applied only under ``if self.min_kept > 0``);
  * kept = valid & (p <= threshold_n) (ties at the threshold are all kept);
  * image loss = mean CE over the image's kept pixels.
The batch loss is the mean of the image losses over the images that have at least one
kept pixel: an all-ignored image contributes nothing and is not counted in the
denominator; a batch without any kept pixel gives 0 with zero gradient, never NaN. The
gradient of a kept pixel of image n is (softmax - onehot) / (num_counted_images * count_n).

Why per image: the published Cityscapes runs used 8 GPUs x 1 image with
``min_kept = 50000 x images per GPU`` selected over each GPU's batch, i.e. per image, and
averaging the 8 GPUs' gradients made the loss the mean of the images' means. This is that
loss, independent of the GPU count and the per-process batch. (One difference: an image
without a kept pixel made the official per-GPU loss NaN -- ``F.cross_entropy`` over an
all-ignored target -- and so the whole averaged step; here it is left out of the mean.)
The older rule that selected ``min_kept`` pixels over the whole process batch is gone:
it made the result depend on the GPU count.

The reference below is the official sort-based formulation, batched over the images: one
``torch.sort`` over (N, H*W) with invalid pixels pushed past every probability, so the
min_kept-th column is each image's t_n, and no host synchronisation or data-dependent shape
is needed. (Not ``torch.kthvalue``: on CUDA that runs as one block, and this reference is
also the benchmarks' eager baseline.)
"""

from __future__ import annotations

import torch


def ohem_per_pixel(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """Per-pixel (ce, p_target, valid), each (N, H*W), computed in at least fp32."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    n = x.shape[0]
    valid = target != ignore_index
    safe_t = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
    logp = torch.log_softmax(x, dim=1).gather(1, safe_t.unsqueeze(1)).squeeze(1)
    return (-logp).reshape(n, -1), logp.detach().exp().reshape(n, -1), valid.reshape(n, -1)


def ohem_threshold(p: torch.Tensor, valid: torch.Tensor, thresh: float,
                   min_kept: int) -> torch.Tensor:
    """Per-image probability thresholds (N,) from p and valid of shape (N, H*W); +inf keeps
    every valid pixel of its image."""
    n, hw = p.shape
    inf = torch.full((n,), float("inf"), dtype=p.dtype, device=p.device)
    if min_kept <= 0 or min_kept > hw:
        # Mining off (min_kept <= 0, as the official code), or more than an image holds:
        # num_valid_n <= H*W < min_kept for every image, so every valid pixel is kept.
        return inf
    # Invalid pixels are pushed to 2 (past every probability): the min_kept-th column of
    # each sorted row is then a valid pixel's p whenever num_valid_n >= min_kept.
    keys = torch.where(valid, p, torch.full_like(p, 2.0))
    kth = torch.sort(keys, dim=1).values[:, min_kept - 1]
    return torch.where(valid.sum(1) > min_kept, torch.clamp_min(kth, thresh), inf)


def ohem_cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor,
                                 thresh: float = 0.7, min_kept: int = 50000,
                                 ignore_index: int = 255) -> torch.Tensor:
    """OHEM CE selected per image (module docstring): the mean over the images with a kept
    pixel of each image's mean CE over its kept pixels; 0 when no pixel is kept.
    logits (N, C, H, W), target (N, H, W); ``min_kept`` is per image."""
    ce, p, valid = ohem_per_pixel(logits, target, ignore_index)
    threshold = ohem_threshold(p, valid, thresh, min_kept)
    kept = valid & (p <= threshold[:, None])
    count = kept.sum(1)
    image_sum = torch.where(kept, ce, torch.zeros_like(ce)).sum(1)
    image_mean = image_sum / count.clamp_min(1).to(ce.dtype)
    # images without a kept pixel add 0 (with zero gradient) and are not counted; clamps
    # keep an all-ignored batch at 0 / 1 without a host-side branch
    num_images = (count > 0).sum().clamp_min(1).to(ce.dtype)
    return (image_mean.sum() / num_images).to(logits.dtype)


# ============================================================================== Triton
# Forward, all on the device with data-independent launch shapes (no sort, no host sync);
# the selection is segmented: every image has its own histograms, state and threshold.
#   1. ohem_pass1_kernel, grid (pixel blocks, N): per pixel p = softmax(x)[t],
#      ce = -log p (as lse - x_t), the key (bits of p, -1 when not valid), and the image's
#      histogram of the key's top 10 bits (hist[n, 0]).
#   2. radix selection of each image's min_kept-th smallest key among its valid pixels: p is
#      in [0, 1], so its fp32 bits are a monotonic unsigned integer below 2**30 and three
#      10-bit digits [29:20] [19:10] [9:0] determine it. After each histogram a select
#      kernel with grid (N,) scans image n's 1024 bins (cumsum), finds the bin holding its
#      k-th key and writes (prefix, k within that bin, num_valid) to state[n]; then
#      ohem_hist_kernel, grid (key blocks, N), histograms the next digit of image n's keys
#      that share its prefix (images with num_valid_n <= min_kept skip the read: they keep
#      every valid pixel). The last select turns the key back into t_n and writes
#      threshold[n] = max(t_n, thresh) if num_valid_n > min_kept else +inf.
#   3. ohem_loss_kernel, grid (key blocks, N): per-program sum of ce and count over
#      kept = valid & p <= threshold[n] (the same fp32 bits the selection used);
#      ohem_finalize_kernel (one program) adds each image's partials in a fixed order, the
#      image means, their mean over the images with a kept pixel, and the per-image weight
#      1 / (num_counted_images * count_n) for the backward.
# Backward: ohem_bwd_kernel recomputes softmax from the logits and writes
# (softmax - onehot) * kept * grad_out * weight[n] directly. Writing an unnormalised
# gradient in the forward would cost an extra write + read of C*es bytes per pixel (the kept
# mask is only known after the selection, and grad_output only in the backward), so here the
# recompute is the cheapest schedule: 3*C*es bytes per pixel for forward + backward.
#
# Bytes per pixel (es = element size): pass 1 reads C*es + target, writes 8 (key, ce);
# two histogram passes read 4 each (none for an image that keeps every valid pixel); the
# loss pass reads 8; backward reads C*es + target + 4 (key) and writes C*es. Cityscapes
# 16x19x800^2 bf16: 10.24 M px * (3*38 + 2 + 28) B = 1.47 GB for forward + backward. The
# per-image histograms (N * 3 * 4 KB), state and partials are noise beside that.
# Integer atomics only (histograms): the loss is bitwise reproducible run to run.
from ._common import (AOT_VARIANTS, HAVE_TRITON, INT32_MAX, check_logits,  # noqa: E402
                      check_runnable, define_op, empty_like_prepared, prepare_logits,
                      rows_variant, tile_config)

RADIX_BITS = 10
NBINS = 1 << RADIX_BITS        # 1024 real bins per digit
HIST_BINS = 2 * NBINS          # tl.histogram domain: bin NBINS collects "not counted" keys
STATE_COLS = 4                 # state[n] = (prefix, k, num_valid, unused), int64

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import load_logits_tile, pick, softmax_stats

    RADIX_BITS_C = tl.constexpr(RADIX_BITS)   # a global read inside @triton.jit must be constexpr
    STATE_COLS_C = tl.constexpr(STATE_COLS)

    @triton.jit
    def ohem_pass1_kernel(logits_ptr, target_ptr, key_ptr, ce_ptr, hist_ptr, HW, ignore_index,
                          NUM_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_P: tl.constexpr, TILES: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr,
                          NBINS: tl.constexpr, HIST_BINS: tl.constexpr):
        """Grid (cdiv(HW, BLOCK_P*TILES), N): per-pixel key and ce, and hist[n, 0] of
        key >> 20. The program's histogram is accumulated in registers over its tiles and
        added to its image's with integer atomics on the non-empty bins only
        (deterministic)."""
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
        tl.atomic_add(hist_ptr + n * (3 * NBINS) + bins, hist,
                      mask=(bins < NBINS) & (hist > 0))

    @triton.jit
    def ohem_hist_kernel(key_ptr, state_ptr, hist_ptr, HW, min_kept, PASS: tl.constexpr,
                         BLOCK: tl.constexpr, NBINS: tl.constexpr, HIST_BINS: tl.constexpr):
        """Grid (cdiv(HW, BLOCK), N): histogram hist[n, PASS] of digit PASS (1: bits
        19..10, 2: bits 9..0) of image n's valid keys whose higher digits equal the prefix
        its selection chose so far (state[n, 0]). An image with num_valid <= min_kept keeps
        every valid pixel: its keys are not read."""
        n = tl.program_id(1)
        num_valid = tl.load(state_ptr + n * STATE_COLS_C + 2)
        if num_valid > min_kept:
            prefix = tl.load(state_ptr + n * STATE_COLS_C).to(tl.int32)
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            key = tl.load(key_ptr + n.to(tl.int64) * HW + offs, mask=offs < HW, other=-1)
            shift = (2 - PASS) * RADIX_BITS_C
            match = (key >= 0) & ((key >> (shift + RADIX_BITS_C)) == prefix)
            digit = tl.where(match, (key >> shift) & (NBINS - 1), NBINS)
            hist = tl.histogram(digit, HIST_BINS)
            bins = tl.arange(0, HIST_BINS)
            tl.atomic_add(hist_ptr + (n * 3 + PASS) * NBINS + bins, hist,
                          mask=(bins < NBINS) & (hist > 0))

    @triton.jit
    def ohem_select_kernel(hist_ptr, state_ptr, threshold_ptr, min_kept, thresh,
                           PASS: tl.constexpr, NBINS: tl.constexpr):
        """Grid (N,): the bin of hist[n, PASS] holding image n's k-th smallest key; updates
        state[n] = (prefix, k, num_valid) in device memory; after the last digit writes
        threshold[n]. When the image has fewer than k keys (num_valid < min_kept) the bin is
        NBINS, nothing matches later, and its threshold is +inf anyway."""
        n = tl.program_id(0)
        bins = tl.arange(0, NBINS)
        h = tl.load(hist_ptr + (n * 3 + PASS) * NBINS + bins).to(tl.int64)
        st = state_ptr + n * STATE_COLS_C
        if PASS == 0:
            prefix = tl.zeros([], dtype=tl.int64)
            k = tl.zeros([], dtype=tl.int64) + min_kept
            num_valid = tl.sum(h, axis=0)
        else:
            prefix = tl.load(st + 0)
            k = tl.load(st + 1)
            num_valid = tl.load(st + 2)
        cum = tl.cumsum(h, axis=0)
        b = tl.min(tl.where(cum >= k, bins, NBINS), axis=0).to(tl.int64)
        below = tl.sum(tl.where(bins < b, h, 0), axis=0)
        prefix = prefix * NBINS + b
        if PASS < 2:
            tl.store(st + 0, prefix)
            tl.store(st + 1, k - below)
            tl.store(st + 2, num_valid)
        else:
            t = prefix.to(tl.int32).to(tl.float32, bitcast=True)
            thr = tl.where(num_valid > min_kept, tl.maximum(t, thresh), float("inf"))
            tl.store(threshold_ptr + n, thr)

    @triton.jit
    def ohem_loss_kernel(key_ptr, ce_ptr, threshold_ptr, sum_part_ptr, cnt_part_ptr, HW,
                         BLOCK: tl.constexpr):
        """Grid (G = cdiv(HW, BLOCK), N): per-program sum of ce and count over image n's
        kept pixels (valid and p <= threshold[n]), into partials[n, pid]."""
        pid = tl.program_id(0)
        n = tl.program_id(1)
        thr = tl.load(threshold_ptr + n)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < HW
        pix = n.to(tl.int64) * HW
        key = tl.load(key_ptr + pix + offs, mask=m, other=-1)
        ce = tl.load(ce_ptr + pix + offs, mask=m, other=0.0)
        kept = (key >= 0) & (key.to(tl.float32, bitcast=True) <= thr)
        slot = n * tl.num_programs(0) + pid
        tl.store(sum_part_ptr + slot, tl.sum(tl.where(kept, ce, 0.0), axis=0))
        tl.store(cnt_part_ptr + slot, tl.sum(kept.to(tl.int32), axis=0))

    @triton.jit
    def _image_totals(sum_part_ptr, cnt_part_ptr, rows, N, G, BLOCK_N: tl.constexpr,
                      BLOCK_G: tl.constexpr):
        """(sum, count) of images ``rows`` from their G partials, added in a fixed order."""
        cols = tl.arange(0, BLOCK_G)
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.int32)
        for g0 in range(0, G, BLOCK_G):
            c = g0 + cols
            m = (rows < N)[:, None] & (c < G)[None, :]
            offs = rows[:, None] * G + c[None, :]
            acc += tl.load(sum_part_ptr + offs, mask=m, other=0.0)
            cnt += tl.load(cnt_part_ptr + offs, mask=m, other=0)
        return tl.sum(acc, axis=1), tl.sum(cnt, axis=1)

    @triton.jit
    def ohem_finalize_kernel(sum_part_ptr, cnt_part_ptr, N, G, loss_ptr, weight_ptr,
                             BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        """One program: loss = mean over the images with count_n > 0 of sum_n / count_n
        (0 when there is none), and weight[n] = 1 / (num_counted * count_n) (count_n and
        num_counted clamped to >= 1). Fixed-order sums (no float atomics): bitwise
        reproducible. The counts are read twice (N * G int32, a few KB) rather than kept
        from the first loop: the weights need the number of counted images first."""
        r = tl.arange(0, BLOCK_N)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        counted = tl.zeros([BLOCK_N], dtype=tl.int32)
        for n0 in range(0, N, BLOCK_N):
            s, c = _image_totals(sum_part_ptr, cnt_part_ptr, n0 + r, N, G, BLOCK_N, BLOCK_G)
            total += tl.where(c > 0, s / tl.maximum(c, 1).to(tl.float32), 0.0)
            counted += (c > 0).to(tl.int32)
        num = tl.maximum(tl.sum(counted, axis=0), 1).to(tl.float32)
        tl.store(loss_ptr, (tl.sum(total, axis=0) / num).to(loss_ptr.dtype.element_ty))
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + r
            _, c = _image_totals(sum_part_ptr, cnt_part_ptr, rows, N, G, BLOCK_N, BLOCK_G)
            w = 1.0 / (num * tl.maximum(c, 1).to(tl.float32))
            tl.store(weight_ptr + rows, w, mask=rows < N)

    @triton.jit
    def ohem_bwd_kernel(logits_ptr, target_ptr, key_ptr, threshold_ptr, grad_out_ptr,
                        weight_ptr, grad_ptr, HW,
                        NUM_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_P: tl.constexpr, TILES: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr):
        """grad = (softmax(x) - onehot(t)) * kept * grad_out * weight[n], straight from the
        logits; kept uses the stored keys (-1 where not valid) and threshold[n], so it is
        exactly the forward's kept set and the target is only read as a class (clamped,
        never an address)."""
        pid_s = tl.program_id(0)
        n = tl.program_id(1)
        img = n.to(tl.int64) * HW * NUM_CLASSES
        pix = n.to(tl.int64) * HW
        c_offs = tl.arange(0, BLOCK_C)
        thr = tl.load(threshold_ptr + n)
        scale = tl.load(grad_out_ptr).to(tl.float32) * tl.load(weight_ptr + n)
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
    # 8 warps: with 4, triton 3.6 (the GPU machine's) spills the PASS=2 program's
    # 4096-key + 2048-bin histogram (255 registers, 64 B of spills on sm_90; 3.9 does not).
    HIST_WARPS = 8
    LOSS_BLOCK = 4096
    # The finaliser's tile: 16 images x 128 partials (Cityscapes: G = 157 per image, so two
    # column steps; 8 x 800^2 images take one row step).
    FINAL_BLOCK_N = 16
    FINAL_BLOCK_G = 128
    FINAL_WARPS = 4

    def _ohem_impl(logits, target, thresh, min_kept, ignore_index, block_p=None, tiles=None,
                   num_warps=None):
        """(loss, key, threshold (N,), weight (N,)); block_p / tiles / num_warps override the
        per-pixel launch shape (tests, benchmarks/kernels.py --sweep)."""
        check_runnable("ohem_cross_entropy", logits, target)
        check_logits("ohem_cross_entropy", logits)
        x, cl = prepare_logits(logits)
        n, c, h, w = x.shape
        hw = h * w
        if n * hw > INT32_MAX:
            raise ValueError(f"ohem_cross_entropy: {n * hw} pixels; the selection kernels "
                             f"count and index keys in 32 bits (at most {INT32_MAX})")
        dev = x.device
        t = target.contiguous()
        cfg = tile_config(c, hw, cl, 1, block_p, tiles, num_warps)
        g0 = triton.cdiv(hw, cfg.block_p * cfg.tiles) if hw > 0 else 0
        key = torch.empty((n, h, w), dtype=torch.int32, device=dev)
        ce = torch.empty((n, h, w), dtype=torch.float32, device=dev)
        hist = torch.zeros((n, 3, NBINS), dtype=torch.int32, device=dev)  # atomics add into it
        if g0 * n > 0:
            kernel = ohem_pass1_kernel_rows if cfg.rows else ohem_pass1_kernel
            kernel[(g0, n)](
                x, t, key, ce, hist, hw, ignore_index, NUM_CLASSES=c, BLOCK_C=cfg.block_c,
                BLOCK_P=cfg.block_p, TILES=cfg.tiles, CHANNELS_LAST=cl, NBINS=NBINS,
                HIST_BINS=HIST_BINS, num_warps=cfg.num_warps)
        if 1 <= min_kept <= hw and n > 0:
            threshold = torch.empty(n, dtype=torch.float32, device=dev)
            state = torch.empty((n, STATE_COLS), dtype=torch.int64, device=dev)  # PASS 0 fills
            gh = triton.cdiv(hw, HIST_BLOCK)
            for pass_ in range(3):
                if pass_ > 0:
                    ohem_hist_kernel[(gh, n)](key, state, hist, hw, min_kept, PASS=pass_,
                                              BLOCK=HIST_BLOCK, NBINS=NBINS,
                                              HIST_BINS=HIST_BINS, num_warps=HIST_WARPS)
                ohem_select_kernel[(n,)](hist, state, threshold, min_kept, float(thresh),
                                         PASS=pass_, NBINS=NBINS, num_warps=4)
        else:
            # Static: min_kept <= 0 (mining off) or more pixels than an image holds.
            threshold = torch.full((n,), float("inf"), dtype=torch.float32, device=dev)
        gl = triton.cdiv(hw, LOSS_BLOCK) if hw > 0 else 0
        sum_part = torch.empty(max(1, n * gl), dtype=torch.float32, device=dev)
        cnt_part = torch.empty(max(1, n * gl), dtype=torch.int32, device=dev)
        if n * gl > 0:      # every program writes its own slot: no memset
            ohem_loss_kernel[(gl, n)](key, ce, threshold, sum_part, cnt_part, hw,
                                      BLOCK=LOSS_BLOCK, num_warps=4)
        loss = torch.empty((), dtype=logits.dtype, device=dev)
        weight = torch.empty(n, dtype=torch.float32, device=dev)
        ohem_finalize_kernel[(1,)](sum_part, cnt_part, n, gl, loss, weight,
                                   BLOCK_N=FINAL_BLOCK_N, BLOCK_G=FINAL_BLOCK_G,
                                   num_warps=FINAL_WARPS)
        return loss, key, threshold, weight

    def _ohem_bwd_impl(grad_out, logits, target, key, threshold, weight, ignore_index,
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
                x, target.contiguous(), key, threshold, grad_out.contiguous(), weight,
                grad, hw, NUM_CLASSES=c, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
                TILES=cfg.tiles, CHANNELS_LAST=cl, num_warps=cfg.num_warps)
        return grad

    def _ohem_fake(logits, target, thresh, min_kept, ignore_index):
        n, _, h, w = logits.shape
        return (logits.new_empty(()), logits.new_empty((n, h, w), dtype=torch.int32),
                logits.new_empty((n,), dtype=torch.float32),
                logits.new_empty((n,), dtype=torch.float32))

    def _ohem_bwd_fake(grad_out, logits, target, key, threshold, weight, ignore_index):
        return empty_like_prepared(logits)

    ohem_backward_op = define_op(
        "cps_fast::ohem_cross_entropy_triton_backward",
        "(Tensor grad_out, Tensor logits, Tensor target, Tensor key, Tensor threshold, "
        "Tensor weight, int ignore_index) -> Tensor",
        lambda *args: _ohem_bwd_impl(*args), _ohem_bwd_fake)

    def _ohem_setup(ctx, inputs, output):
        logits, target, _, _, ignore_index = inputs
        _, key, threshold, weight = output
        ctx.save_for_backward(logits, target, key, threshold, weight)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(key, threshold, weight)
        # No zero tensors for the outputs nobody differentiates (issue 13): their grads
        # arrive as None, and so does the loss's when only they were used.
        ctx.set_materialize_grads(False)

    def _ohem_backward(ctx, g_loss, g_key, g_thr, g_weight):
        if g_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, target, key, threshold, weight = ctx.saved_tensors
        grad = ohem_backward_op(g_loss, logits, target, key, threshold, weight,
                                ctx.ignore_index)
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
        """OHEM CE selected per image, with the reference's semantics; differentiable in
        logits. The op's outputs are (loss, key = bits of p per pixel (-1 where not valid),
        threshold (N,), weight (N,) = 1 / (num_counted_images * count_n)); only the loss is
        returned."""
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
                           "weight_ptr": "*fp32", "grad_ptr": f"*{dt}", "HW": "i32"},
                constexprs=common,
                divisible=div_hw + ("key_ptr", "grad_ptr"),
                num_warps=cfg.num_warps))
        for pass_ in (1, 2):
            out.append(dict(
                name=f"ohem_hist[PASS={pass_}]", fn=ohem_hist_kernel,
                signature={"key_ptr": "*i32", "state_ptr": "*i64", "hist_ptr": "*i32",
                           "HW": "i32", "min_kept": "i32"},
                constexprs=dict(PASS=pass_, BLOCK=HIST_BLOCK, NBINS=NBINS, HIST_BINS=HIST_BINS),
                divisible=("key_ptr", "state_ptr", "hist_ptr", "HW"), num_warps=HIST_WARPS))
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
                       "sum_part_ptr": "*fp32", "cnt_part_ptr": "*i32", "HW": "i32"},
            constexprs=dict(BLOCK=LOSS_BLOCK),
            divisible=("key_ptr", "ce_ptr", "threshold_ptr", "sum_part_ptr", "cnt_part_ptr",
                       "HW"), num_warps=4))
        out.append(dict(
            name="ohem_finalize", fn=ohem_finalize_kernel,
            signature={"sum_part_ptr": "*fp32", "cnt_part_ptr": "*i32", "N": "i32", "G": "i32",
                       "loss_ptr": "*bf16", "weight_ptr": "*fp32"},
            constexprs=dict(BLOCK_N=FINAL_BLOCK_N, BLOCK_G=FINAL_BLOCK_G),
            divisible=("sum_part_ptr", "cnt_part_ptr", "weight_ptr"), num_warps=FINAL_WARPS))
        return out
