"""Triton OHEM cross-entropy, selected per image (segmented device radix selection), against
the fp64 per-image oracle (tests/ohem_oracle.py: a loop of one sort per image), under
TRITON_INTERPRET=1. Every check goes through ``check_backend``: the kernel's thresholds are
exactly the rule on its own fp32 p, its kept set differs from the fp64 oracle's only at a few
pixels next to the threshold, and loss and gradient match the oracle on the kernel's kept
set. Fresh seeds each run, printed in every assertion message."""
from __future__ import annotations

import pytest
import torch

from kernel_testutil import (DTYPES, fresh_generator, labels, logits, need_compiled_triton,
                             need_triton)
from ohem_oracle import check_backend, check_selection_exact, mixed_labels, ohem_oracle

from cps_fast import ops
from cps_fast.kernels.ohem_cross_entropy import ohem_cross_entropy_reference


@pytest.fixture(autouse=True)
def _triton():
    need_triton()


def _run(x, t, thresh, min_kept, grad_out=1.0):
    """(loss, grad of grad_out * loss, key, threshold) from the registered op; grad_out is
    rounded to the logits dtype first (the value autograd really passes)."""
    xt = x.detach().clone().requires_grad_(True)
    loss, key, thr, _ = torch.ops.cps_fast.ohem_cross_entropy_triton(xt, t, thresh, min_kept,
                                                                      255)
    g = torch.tensor(grad_out, dtype=x.dtype)
    loss.backward(g)
    return loss.detach(), xt.grad, key, thr, float(g)


def _check(x, t, thresh, min_kept, what, grad_out=1.0):
    loss, grad, key, thr, g = _run(x, t, thresh, min_kept, grad_out)
    assert loss.dtype == x.dtype and thr.shape == (x.shape[0],), what
    o = check_backend(x.double(), t, thresh, min_kept, loss, grad, key, thr, x.dtype, what,
                      grad_out=g)
    return o, key, thr, loss, grad


@pytest.mark.parametrize("c", [19, 2])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("thresh,min_kept", [(0.7, 60), (0.05, 60), (0.0, 1), (0.3, 91),
                                             (0.7, 150)])
def test_matches_the_per_image_oracle(c, dt, channels_last, thresh, min_kept):
    """Odd shape (7x13 = 91 px per image); image 0 ~73 valid pixels, image 1 ~9 (fewer than
    min_kept: keeps them all), image 2 all ignored (left out of the mean), image 3 again
    ~73. min_kept 91 = H*W, 150 > H*W (the static keep-everything path)."""
    gen, seed = fresh_generator()
    x, _ = logits(gen, 4, c, 7, 13, DTYPES[dt], channels_last)
    t = mixed_labels(gen, 4, c, 7, 13)
    g_out = 1.0 + torch.rand((), generator=gen).item()
    o, *_ = _check(x, t, thresh, min_kept, f"seed {seed}", g_out)
    assert not o.kept[2].any(), seed


def test_fp16():
    gen, seed = fresh_generator()
    x, _ = logits(gen, 3, 19, 7, 13, torch.float16)
    _check(x, mixed_labels(gen, 3, 19, 7, 13), 0.05, 60, f"seed {seed}")


@pytest.mark.parametrize("min_kept", [0, -5, 1, 29, 30, 31, 90, 91, 92, 10**6])
def test_min_kept_edges(min_kept):
    """Image 0: all 91 pixels valid; image 1: exactly 30 valid. k <= 0 (mining off), 1,
    num_valid - 1 / num_valid / num_valid + 1 of each image, H*W, > H*W."""
    gen, seed = fresh_generator()
    x, _ = logits(gen, 2, 19, 7, 13, torch.float32)
    t = labels(gen, 2, 19, 7, 13, ignore_frac=0.0)
    t[1].view(-1)[torch.randperm(91, generator=gen)[30:]] = 255
    o, key, thr, _, _ = _check(x, t, 0.0, min_kept, f"k={min_kept} seed {seed}")
    p = key.view(torch.float32).reshape(2, -1)
    for i, nv in enumerate((91, 30)):
        kept = int(o.kept[i].sum())
        if min_kept <= 0 or min_kept >= nv:
            assert kept == nv and thr[i] == float("inf"), (i, seed)  # all valid pixels kept
        else:
            distinct = len(torch.unique(p[i][t[i].reshape(-1) != 255])) == nv
            assert kept >= min_kept and (kept == min_kept or not distinct), (i, seed)


def test_ties_at_the_threshold_are_all_kept():
    """Image 0: nine pixels with identical logits and target (bit-identical p), the
    min_kept-th smallest falling first, inside and last in the group: all nine kept. Image
    1: a group of six whose p *equals* thresh (thresh is set to the kernel's own p of the
    group): all six kept too (p <= threshold)."""
    gen, seed = fresh_generator()
    n, c, h, w = 2, 21, 7, 13
    x, _ = logits(gen, n, c, h, w, torch.float32)
    t = labels(gen, n, c, h, w, ignore_frac=0.1)
    flat_x = x.permute(0, 2, 3, 1).reshape(n, -1, c)          # a view into x
    flat_t = t.reshape(n, -1)
    groups = []
    for i, size in ((0, 9), (1, 6)):
        idx = (flat_t[i] != 255).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)[:size]]
        flat_x[i, idx] = flat_x[i, idx[0]].clone()
        flat_t[i, idx] = flat_t[i, idx[0]].clone()
        groups.append(idx)
    x = flat_x.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()
    _, key, _, _ = torch.ops.cps_fast.ohem_cross_entropy_triton(x, t, 0.0, 1, 255)
    p = key.view(torch.float32).reshape(n, -1)
    p0 = p[0, groups[0][0]]
    below = int(((p[0] < p0) & (flat_t[0] != 255)).sum())
    thresh_eq = float(p[1, groups[1][0]])                  # exactly the group's fp32 p
    for k in (below + 1, below + 5, below + 9):          # first, inside, last of the group
        what = f"k={k} seed {seed}"
        _, _, key, thr, _ = _run(x, t, 0.0, k)
        kept = check_selection_exact(key, thr, t, 0.0, k, what)
        assert kept[0, groups[0]].all() and int(kept[0].sum()) == below + 9, what
    # image 1, thresh = its group's p and min_kept 1: threshold = thresh, the group is kept
    what = f"thresh={thresh_eq!r} seed {seed}"
    loss, grad, key, thr, _ = _run(x, t, thresh_eq, 1)
    kept = check_selection_exact(key, thr, t, thresh_eq, 1, what)
    assert float(thr[1]) == thresh_eq and kept[1, groups[1]].all(), what
    # loss and gradient on that kept set, against the oracle told the same kept set (its
    # fp64 p of the group may round to either side of the fp32 thresh)
    o = ohem_oracle(x.double(), t, thresh_eq, 1, kept=kept)
    assert abs(loss.item() - o.loss) <= 1e-5 * max(1.0, o.loss), what
    assert (grad.double() - o.grad).abs().max() <= 1e-5 * o.grad.abs().max(), what


def test_an_all_ignored_image_changes_nothing():
    """The mean is over the images with a kept pixel: inserting an all-ignored image gives
    the same loss and the same gradients for the other images (and zero for it)."""
    gen, seed = fresh_generator()
    x, _ = logits(gen, 3, 19, 9, 11, torch.float32)
    t = labels(gen, 3, 19, 9, 11)
    t[1] = 255
    keep = torch.tensor([0, 2])
    for thresh, k in ((0.7, 40), (0.0, 0)):
        l3, g3, *_ = _run(x, t, thresh, k)
        l2, g2, *_ = _run(x[keep], t[keep], thresh, k)
        assert abs(l3.item() - l2.item()) <= 1e-6 * max(1.0, l2.item()), seed
        assert torch.allclose(g3[keep], g2, rtol=1e-5, atol=1e-9), seed
        assert (g3[1] == 0).all(), seed


def test_per_image_not_per_batch():
    """The selection is per image: two copies of one image select exactly what that image
    alone selects, so the loss is the single image's loss (a whole-batch min_kept would keep
    twice as many hard pixels per image)."""
    gen, seed = fresh_generator()
    x, _ = logits(gen, 1, 19, 9, 11, torch.float32)
    t = labels(gen, 1, 19, 9, 11, ignore_frac=0.0)
    one, *_ = _run(x, t, 0.0, 10)
    two, _, key, thr, _ = _run(x.repeat(2, 1, 1, 1), t.repeat(2, 1, 1), 0.0, 10)
    assert abs(one.item() - two.item()) <= 1e-6 * max(1.0, one.item()), seed
    assert thr[0] == thr[1], seed
    kept = check_selection_exact(key, thr, t.repeat(2, 1, 1), 0.0, 10, f"seed {seed}")
    assert int(kept[0].sum()) == int(kept[1].sum()) >= 10, seed


def test_several_histogram_programs_per_image():
    """More keys per image than one histogram program takes (4096), so the passes add the
    histograms of several programs per image; few classes so that many p share a digit."""
    gen, seed = fresh_generator()
    x, _ = logits(gen, 2, 3, 48, 100, torch.float32, scale=0.5)
    t = mixed_labels(gen, 2, 3, 48, 100, ignore_fracs=(0.1, 0.5))
    for k in (1, 1000, 2300, 4000):
        _check(x, t, 0.0, k, f"k={k} seed {seed}")


def test_extreme_logits_no_nan():
    """Logits of +-1e4 (p exactly 0 or 1, or shared between tied maxima) and a huge range
    inside one image; every value finite, loss and gradient as the oracle's."""
    gen, seed = fresh_generator()
    x = (torch.randint(-1, 2, (3, 21, 7, 13), generator=gen)).float() * 1e4
    x[1] += torch.randn(21, 7, 13, generator=gen) * 30       # moderate next to extreme
    t = mixed_labels(gen, 3, 21, 7, 13, ignore_fracs=(0.2, 0.0, 0.5))
    for thresh, k in ((0.7, 50), (0.0, 1), (1.0, 80), (0.7, 0)):
        _, grad, *_ = _check(x, t, thresh, k, f"thresh={thresh} k={k} seed {seed}")
        assert torch.isfinite(grad).all(), seed


@pytest.mark.parametrize("min_kept", [0, 50])
def test_all_ignored_batch_gives_zero(min_kept):
    gen, _ = fresh_generator()
    x, _ = logits(gen, 2, 19, 7, 13, torch.bfloat16)
    t = torch.full((2, 7, 13), 255, dtype=torch.uint8)
    loss, grad, _, thr, _ = _run(x, t, 0.7, min_kept)
    assert loss.item() == 0.0 and (grad == 0).all() and not torch.isnan(grad).any()
    assert (thr == float("inf")).all()


@pytest.mark.parametrize("block_p,tiles", [(16, 1), (16, 3)])
def test_every_block_size(block_p, tiles):
    from cps_fast.kernels import ohem_cross_entropy as mod
    gen, seed = fresh_generator()
    x, _ = logits(gen, 3, 19, 9, 11, torch.float32, channels_last=True)
    t = mixed_labels(gen, 3, 19, 9, 11)
    loss, key, thr, weight = mod._ohem_impl(x, t, 0.1, 40, 255, block_p=block_p, tiles=tiles)
    grad = mod._ohem_bwd_impl(torch.tensor(1.0), x, t, key, thr, weight, 255,
                              block_p=block_p, tiles=tiles)
    check_backend(x.double(), t, 0.1, 40, loss, grad, key, thr, torch.float32, f"seed {seed}")


def test_out_of_range_targets_are_ignored_in_the_kernel():
    gen, seed = fresh_generator()
    x, _ = logits(gen, 2, 19, 7, 13, torch.float32)
    t = labels(gen, 2, 19, 7, 13)
    bad = torch.rand(2, 7, 13, generator=gen) < 0.3
    t_bad = torch.where(bad, torch.full_like(t, 19), t)
    t_bad[0, 0, 0] = -3
    loss, grad, key, thr, _ = _run(x, t_bad, 0.3, 40)
    t_ref = t_bad.clone()
    t_ref[(t_bad < 0) | (t_bad >= 19)] = 255
    check_backend(x.double(), t_ref, 0.3, 40, loss, grad, key, thr, torch.float32,
                  f"seed {seed}")


def test_the_reference_is_the_triton_kernel_semantics():
    """The eager reference (the benchmarks' baseline) and the kernel agree on the same
    inputs: both per image, both means of image means."""
    gen, seed = fresh_generator()
    x, _ = logits(gen, 4, 19, 7, 13, torch.float32)
    t = mixed_labels(gen, 4, 19, 7, 13)
    for thresh, k in ((0.7, 30), (0.0, 5)):
        ref = ohem_cross_entropy_reference(x, t, thresh, k)
        tri = ops.ohem_cross_entropy(x, t, thresh, k, backend="triton")
        assert abs(ref.item() - tri.item()) <= 1e-5 * max(1.0, ref.item()), seed


def test_no_zero_gradients_materialised():
    """set_materialize_grads(False): backward runs with None for the non-differentiable
    outputs (key, threshold, weight), and a loss that is not used gives no gradient."""
    gen, _ = fresh_generator()
    x, _ = logits(gen, 2, 5, 3, 4, torch.float32)
    x.requires_grad_(True)
    t = labels(gen, 2, 5, 3, 4)
    loss, key, thr, weight = torch.ops.cps_fast.ohem_cross_entropy_triton(x, t, 0.3, 5, 255)
    assert not (key.requires_grad or thr.requires_grad or weight.requires_grad)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    other = (x * 2).sum()
    (g2,) = torch.autograd.grad(other + 0 * loss.detach(), x)
    assert torch.equal(g2, torch.full_like(x, 2.0))


def test_opcheck():
    gen, _ = fresh_generator()
    x, _ = logits(gen, 3, 3, 3, 5, torch.float32)
    x.requires_grad_(True)
    t = mixed_labels(gen, 3, 3, 3, 5)
    for k in (5, 0):
        torch.library.opcheck(torch.ops.cps_fast.ohem_cross_entropy_triton.default,
                              (x, t, 0.3, k, 255))


# ----------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_cityscapes_shape(channels_last):
    """The supervised OHEM of the Cityscapes preset: 8 x 19 x 800^2, thresh 0.7, min_kept
    50000 per image. At this size some pixels' p lie within fp32 rounding of their image's
    threshold: check_backend compares loss and gradient on the kernel's own kept set and
    bounds the pixels where it differs from the fp64 oracle's (all next to the threshold)."""
    need_compiled_triton()
    gen, seed = fresh_generator()
    shape = (8, 19, 800, 800)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=gen).mul_(3).cuda().contiguous(memory_format=fmt)
    t = mixed_labels(gen, 8, 19, 800, 800, ignore_fracs=(0.1, 0.95, 0.3, 1.0)).cuda()
    xt = x.detach().clone().requires_grad_(True)
    loss, key, thr, _ = torch.ops.cps_fast.ohem_cross_entropy_triton(xt, t, 0.7, 50000, 255)
    loss.backward()
    o = check_backend(x, t, 0.7, 50000, loss, xt.grad, key, thr, torch.float32,
                      f"seed {seed}")                     # the fp64 oracle on the GPU
    assert not o.kept[3].any() and o.kept[1].sum() == o.valid[1].sum(), seed
