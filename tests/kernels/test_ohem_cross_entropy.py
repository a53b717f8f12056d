"""Triton OHEM cross-entropy (device radix selection) vs the kthvalue reference and a
sort-based version written after the official code, under TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_testutil import (DTYPES, assert_grad_close, assert_loss_close, fresh_generator,
                             labels, logits, need_compiled_triton, need_triton)

from cps_fast import ops
from cps_fast.kernels.ohem_cross_entropy import (ohem_cross_entropy_reference, ohem_per_pixel,
                                                 ohem_threshold)


@pytest.fixture(autouse=True)
def _triton():
    need_triton()


def official_sort_ohem(pred, target, thresh, min_kept, ignore_index=255):
    """The official ProbOhemCrossEntropy2d (TorchSemiSeg), argsort and all, in fp64."""
    b, c, h, w = pred.size()
    target = target.reshape(-1).long()
    valid_mask = target.ne(ignore_index)
    target = target * valid_mask.long()
    num_valid = int(valid_mask.sum())
    prob = F.softmax(pred, dim=1).transpose(0, 1).reshape(c, -1)
    if min_kept > num_valid:
        pass
    elif num_valid > 0:
        prob = prob.masked_fill(~valid_mask, 1)
        mask_prob = prob[target, torch.arange(len(target))]
        threshold = thresh
        if min_kept > 0:
            index = mask_prob.argsort()
            threshold_index = index[min(len(index), min_kept) - 1]
            if mask_prob[threshold_index] > thresh:
                threshold = mask_prob[threshold_index]
            kept_mask = mask_prob.le(threshold)
            target = target * kept_mask.long()
            valid_mask = valid_mask * kept_mask
    target = target.masked_fill(~valid_mask, ignore_index).view(b, h, w)
    if int(valid_mask.sum()) == 0:
        return pred.sum() * 0.0
    return F.cross_entropy(pred, target, ignore_index=ignore_index)


def _ref(x64, t, thresh, min_kept, grad_out=1.0):
    x = x64.detach().clone().requires_grad_(True)
    loss = ohem_cross_entropy_reference(x, t, thresh, min_kept)
    (loss * grad_out).backward()
    return loss.detach(), x.grad


def _check_kept_set_exact(x, t, thresh, min_kept, seed):
    """The kernel's threshold must be bitwise what the reference rule gives on the kernel's
    own p (so the kept pixel sets are identical)."""
    loss, key, thr, inv = torch.ops.cps_fast.ohem_cross_entropy_triton(x, t, thresh, min_kept, 255)
    valid = (key >= 0).reshape(-1)
    assert torch.equal(valid, (t != 255).reshape(-1)), seed
    p = key.reshape(-1).view(torch.float32).clone()
    p[~valid] = 0.0
    ref_thr = ohem_threshold(p, valid, thresh, min_kept)
    assert thr.item() == ref_thr.item(), f"threshold {thr.item()} vs {ref_thr.item()} (seed {seed})"
    kept = valid & (p <= thr)
    return kept, p, valid


@pytest.mark.parametrize("c", [19, 21, 2])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("thresh,min_kept", [(0.7, 60), (0.05, 60), (0.0, 1), (0.0, 150)])
def test_matches_reference(c, dt, channels_last, thresh, min_kept):
    gen, seed = fresh_generator()
    dtype = DTYPES[dt]
    x, x64 = logits(gen, 2, c, 7, 13, dtype, channels_last)
    t = labels(gen, 2, c, 7, 13)
    g_out = 1.0 + torch.rand((), generator=gen).item()
    xt = x.detach().clone().requires_grad_(True)
    loss = ops.ohem_cross_entropy(xt, t, thresh, min_kept, backend="triton")
    loss.backward(torch.tensor(g_out, dtype=dtype))
    ref_loss, ref_grad = _ref(x64, t, thresh, min_kept, g_out)
    assert loss.dtype == dtype
    assert_loss_close(loss, ref_loss, dtype, "loss", seed)
    _, eager_grad = _ref(x, t, thresh, min_kept, g_out)
    assert_grad_close(xt.grad, ref_grad, eager_grad, dtype, "grad", seed)
    _check_kept_set_exact(x, t, thresh, min_kept, seed)
    official = official_sort_ohem(x64, t, thresh, min_kept)
    assert abs(official.item() - ref_loss.item()) < 1e-9, seed
    assert_loss_close(loss, official, dtype, "loss vs official argsort", seed)


@pytest.mark.parametrize("min_kept", [0, -5, 1, 181, 182, 183, 300, 10**6])
def test_min_kept_edges(min_kept):
    """k = 1, k = num_valid - 1 / num_valid / num_valid + 1, k > every pixel, k <= 0."""
    gen, seed = fresh_generator()
    x, x64 = logits(gen, 2, 19, 7, 13, torch.float32)
    t = labels(gen, 2, 19, 7, 13, ignore_frac=0.0)          # 182 valid pixels
    xt = x.clone().requires_grad_(True)
    loss = ops.ohem_cross_entropy(xt, t, 0.0, min_kept, backend="triton")
    loss.backward()
    ref_loss, ref_grad = _ref(x64, t, 0.0, min_kept)
    assert abs(loss.item() - ref_loss.item()) < 1e-5, (min_kept, seed)
    assert (xt.grad.double() - ref_grad).abs().max() < 1e-6, seed    # k=1: |grad| up to 1
    kept, _, _ = _check_kept_set_exact(x, t, 0.0, min_kept, seed)
    if min_kept <= 0 or min_kept >= 182:
        assert kept.all(), seed                  # mining off / not enough pixels: all kept
    else:
        assert int(kept.sum()) == min_kept, seed  # continuous p: no ties
    official = official_sort_ohem(x64, t, 0.0, max(min_kept, 0))
    assert abs(official.item() - ref_loss.item()) < 1e-9, seed


def test_ties_at_the_threshold_are_kept():
    """Several pixels share exactly the k-th p (identical logits rows and targets): all of
    them are kept (p <= threshold), by the kernel, the reference and the official code."""
    gen, seed = fresh_generator()
    n, c, h, w = 2, 21, 7, 13
    x, _ = logits(gen, n, c, h, w, torch.float32)
    t = labels(gen, n, c, h, w, ignore_frac=0.1)
    flat_x = x.permute(0, 2, 3, 1).reshape(-1, c)
    flat_t = t.reshape(-1)
    valid_idx = (flat_t != 255).nonzero().squeeze(1)
    tied = valid_idx[torch.randperm(len(valid_idx), generator=gen)[:9]]
    flat_x[tied] = flat_x[tied[0]].clone()
    flat_t[tied] = flat_t[tied[0]].clone()
    x = flat_x.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()
    t = flat_t.reshape(n, h, w)
    _, p, valid = _check_kept_set_exact(x, t, 0.0, 1, seed)
    p_tied = p[tied[0]]
    below = int(((p < p_tied) & valid).sum())
    for k in (below + 1, below + 5, below + 9):        # k-th smallest inside the tied group
        kept, _, _ = _check_kept_set_exact(x, t, 0.0, k, seed)
        assert int(kept.sum()) == below + 9, (k, seed)
        assert kept[tied].all(), seed
        loss = ops.ohem_cross_entropy(x, t, 0.0, k, backend="triton")
        ref = ohem_cross_entropy_reference(x.double(), t, 0.0, k)
        official = official_sort_ohem(x.double(), t, 0.0, k)
        assert abs(loss.item() - ref.item()) < 1e-5 and abs(ref.item() - official.item()) < 1e-9, seed


def test_several_histogram_programs():
    """More keys than one histogram program takes (4096), so the passes accumulate the
    histograms of many programs; few classes so that many p share a top digit."""
    gen, seed = fresh_generator()
    x, x64 = logits(gen, 2, 3, 48, 50, torch.float32, scale=0.5)
    t = labels(gen, 2, 3, 48, 50)
    for k in (1, 1000, 3500):
        loss = ops.ohem_cross_entropy(x, t, 0.0, k, backend="triton")
        ref = ohem_cross_entropy_reference(x64, t, 0.0, k)
        assert abs(loss.item() - ref.item()) < 1e-5, (k, seed)
        _check_kept_set_exact(x, t, 0.0, k, seed)


def test_extreme_logits_no_nan():
    gen, seed = fresh_generator()
    x = (torch.randint(0, 2, (2, 21, 7, 13), generator=gen) * 2 - 1).float() * 1e4
    t = labels(gen, 2, 21, 7, 13)
    xt = x.clone().requires_grad_(True)
    loss = ops.ohem_cross_entropy(xt, t, 0.7, 50, backend="triton")
    loss.backward()
    ref_loss, ref_grad = _ref(x.double(), t, 0.7, 50)
    assert torch.isfinite(loss) and torch.isfinite(xt.grad).all(), seed
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, ref_loss.item()), seed
    assert (xt.grad.double() - ref_grad).abs().max() < 1e-6, seed


@pytest.mark.parametrize("min_kept", [0, 50])
def test_all_ignored_gives_zero(min_kept):
    gen, _ = fresh_generator()
    x, _ = logits(gen, 2, 19, 7, 13, torch.bfloat16)
    x.requires_grad_(True)
    t = torch.full((2, 7, 13), 255, dtype=torch.uint8)
    loss = ops.ohem_cross_entropy(x, t, 0.7, min_kept, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


@pytest.mark.parametrize("block_p,tiles", [(16, 1), (16, 3)])
def test_every_block_size(block_p, tiles):
    from cps_fast.kernels import ohem_cross_entropy as mod
    gen, seed = fresh_generator()
    x, x64 = logits(gen, 3, 19, 9, 11, torch.float32, channels_last=True)
    t = labels(gen, 3, 19, 9, 11)
    loss, key, thr, inv = mod._ohem_impl(x, t, 0.1, 100, 255, block_p=block_p, tiles=tiles)
    grad = mod._ohem_bwd_impl(torch.tensor(1.0), x, t, key, thr, inv, 255,
                              block_p=block_p, tiles=tiles)
    ref_loss, ref_grad = _ref(x64, t, 0.1, 100)
    assert abs(loss.item() - ref_loss.item()) < 1e-5, seed
    assert (grad.double() - ref_grad).abs().max() < 1e-7, seed


def test_out_of_range_targets_are_ignored_in_the_kernel():
    gen, seed = fresh_generator()
    x, x64 = logits(gen, 2, 19, 7, 13, torch.float32)
    t = labels(gen, 2, 19, 7, 13)
    bad = torch.rand(2, 7, 13, generator=gen) < 0.3
    t_bad = torch.where(bad, torch.full_like(t, 19), t)
    t_bad[0, 0, 0] = -3
    xt = x.clone().requires_grad_(True)
    out = torch.ops.cps_fast.ohem_cross_entropy_triton(xt, t_bad, 0.3, 40, 255)
    out[0].backward()
    t_ref = t_bad.clone()
    t_ref[(t_bad < 0) | (t_bad >= 19)] = 255
    ref_loss, ref_grad = _ref(x64, t_ref, 0.3, 40)
    assert abs(out[0].item() - ref_loss.item()) < 1e-5, seed
    assert (xt.grad.double() - ref_grad).abs().max() < 1e-7, seed


def test_fp16():
    gen, seed = fresh_generator()
    x, x64 = logits(gen, 2, 19, 7, 13, torch.float16)
    t = labels(gen, 2, 19, 7, 13)
    xt = x.clone().requires_grad_(True)
    loss = ops.ohem_cross_entropy(xt, t, 0.05, 60, backend="triton")
    loss.backward()
    ref_loss, ref_grad = _ref(x64, t, 0.05, 60)
    _, eager_grad = _ref(x, t, 0.05, 60)
    assert_loss_close(loss, ref_loss, torch.float16, "loss", seed)
    assert_grad_close(xt.grad, ref_grad, eager_grad, torch.float16, "grad", seed)


def test_opcheck():
    gen, _ = fresh_generator()
    x, _ = logits(gen, 1, 3, 3, 5, torch.float32)
    x.requires_grad_(True)
    t = labels(gen, 1, 3, 3, 5)
    torch.library.opcheck(torch.ops.cps_fast.ohem_cross_entropy_triton.default,
                          (x, t, 0.3, 5, 255))


# ----------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_cityscapes_shape(channels_last):
    need_compiled_triton()
    gen, seed = fresh_generator()
    shape = (16, 19, 800, 800)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=gen).mul_(3).cuda().contiguous(memory_format=fmt)
    t = labels(gen, 16, 19, 800, 800).cuda()
    xt = x.detach().clone().requires_grad_(True)
    loss = ops.ohem_cross_entropy(xt, t, 0.7, 50000, backend="triton")
    loss.backward()
    xr = x.detach().clone().requires_grad_(True)
    ref = ohem_cross_entropy_reference(xr, t, 0.7, 50000)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1, ref.item()), seed
    assert (xt.grad - xr.grad).abs().max().item() < 1e-3 * xr.grad.abs().max().item(), seed
    # the kept set from the kernel's own p, exactly
    _, key, thr, _ = torch.ops.cps_fast.ohem_cross_entropy_triton(x, t, 0.7, 50000, 255)
    valid = (key >= 0).reshape(-1)
    p = torch.where(valid, key.reshape(-1).view(torch.float32), torch.zeros(()).cuda())
    assert thr.item() == ohem_threshold(p, valid, 0.7, 50000).item(), seed
