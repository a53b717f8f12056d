"""The eager references (torch backend) against hand-computed values, and the dispatch."""

import math
import os

import pytest
import torch

from cps_fast import ops
from cps_fast.errors import ConfigError


def _logits(rows):
    """(1, C, 1, W) logits from a list of per-pixel class-score lists."""
    return torch.tensor(rows, dtype=torch.float64).t().reshape(1, len(rows[0]), 1, len(rows))


def test_cross_entropy_hand_computed():
    x = _logits([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 1.0]])
    t = torch.tensor([[[0, 1, 255]]])
    # pixel 0: -log(1/2); pixel 1: -log(1/4); pixel 2 ignored.
    expected = (math.log(2) + math.log(4)) / 2
    assert float(ops.cross_entropy(x, t, backend="torch")) == pytest.approx(expected, rel=1e-12)


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.full((2, 4, 5), 255)
    loss = ops.cross_entropy(x, t, backend="torch")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(x.grad) == 0
    assert not torch.isnan(x.grad).any()


def test_ohem_threshold_hand_computed():
    # p(target) = 0.5, 0.2, 0.9 (two classes); min_kept = 1 -> t = 0.2 < 0.7: keep p <= 0.7.
    p = torch.tensor([0.5, 0.2, 0.9], dtype=torch.float64)
    x = _logits([[math.log(q), math.log(1 - q)] for q in p.tolist()])
    t = torch.zeros(1, 1, 3, dtype=torch.long)
    expected = (-math.log(0.5) - math.log(0.2)) / 2
    got = ops.ohem_cross_entropy(x, t, thresh=0.7, min_kept=1, backend="torch")
    assert float(got) == pytest.approx(expected, rel=1e-10)
    # min_kept = 3 of 3 valid: all kept.
    got = ops.ohem_cross_entropy(x, t, thresh=0.7, min_kept=3, backend="torch")
    assert float(got) == pytest.approx(float(-torch.log(p).mean()), rel=1e-10)


def test_ohem_selects_per_image_hand_computed():
    """Two images, min_kept = 2 each, thresh 0.3. Image 0: p = 0.1, 0.2, 0.6, 0.9 -> t = 0.2,
    threshold max(0.2, 0.3) = 0.3: keeps 0.1, 0.2. Image 1: p = 0.5, 0.8, ignored, ignored
    -> 2 valid pixels, not more than min_kept: keeps both. A third, all-ignored image is not
    counted. Loss = mean of the two image means. (One min_kept over the whole batch would
    have kept 0.1 and 0.2 only, and averaged over pixels.)"""
    rows = [[0.1, 0.2, 0.6, 0.9], [0.5, 0.8, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]
    x = torch.tensor([[[math.log(q) for q in r], [math.log(1 - q) for q in r]] for r in rows],
                     dtype=torch.float64).reshape(3, 2, 1, 4)
    t = torch.tensor([[0, 0, 0, 0], [0, 0, 255, 255], [255, 255, 255, 255]]).reshape(3, 1, 4)
    img0 = (-math.log(0.1) - math.log(0.2)) / 2
    img1 = (-math.log(0.5) - math.log(0.8)) / 2
    xr = x.clone().requires_grad_(True)
    got = ops.ohem_cross_entropy(xr, t, thresh=0.3, min_kept=2, backend="torch")
    assert float(got.detach()) == pytest.approx((img0 + img1) / 2, rel=1e-10)
    got.backward()
    # d/dx of image 0's kept pixel 0 for class 0: (p - 1) / (2 images * 2 kept pixels)
    assert float(xr.grad[0, 0, 0, 0]) == pytest.approx((0.1 - 1) / 4, rel=1e-10)
    assert torch.count_nonzero(xr.grad[0, :, :, 2:]) == 0      # dropped pixels
    assert torch.count_nonzero(xr.grad[2]) == 0                # the all-ignored image


def test_ohem_reference_matches_the_per_image_oracle():
    """The batched-sort reference against the oracle (a loop of per-image sorts), fp64: images
    with more and fewer valid pixels than min_kept, an all-ignored image, min_kept <= 0,
    = H*W, > H*W; loss and gradient. Their kept sets may differ only next to a threshold."""
    from ohem_oracle import check_close, check_kept_near_oracle, mixed_labels, ohem_oracle

    from cps_fast.kernels.ohem_cross_entropy import ohem_per_pixel, ohem_threshold
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 19, 7, 13, generator=gen, dtype=torch.float64) * 3
    t = mixed_labels(gen, 4, 19, 7, 13)
    for thresh, k in ((0.7, 60), (0.05, 60), (0.0, 1), (0.0, 91), (0.7, 92), (0.7, 0)):
        what = f"thresh={thresh} k={k} seed {seed}"
        xr = x.clone().requires_grad_(True)
        loss = ops.ohem_cross_entropy(xr, t, thresh, k, backend="torch")
        loss.backward()
        _, p, valid = ohem_per_pixel(x, t, 255)
        kept = valid & (p <= ohem_threshold(p, valid, thresh, k)[:, None])
        o = ohem_oracle(x, t, thresh, k)
        if check_kept_near_oracle(kept, o, what):
            o = ohem_oracle(x, t, thresh, k, kept=kept)
        check_close(loss, xr.grad, o, torch.float32, what)    # fp64 here: fp32's bounds


def test_ohem_all_ignored_batch_is_zero_with_zero_grad():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.full((2, 4, 5), 255)
    for k in (0, 3, 100):
        loss = ops.ohem_cross_entropy(x, t, 0.7, k, backend="torch")
        (g,) = torch.autograd.grad(loss, x)
        assert float(loss.detach()) == 0.0 and torch.count_nonzero(g) == 0
        assert not torch.isnan(g).any()


def test_cps_loss_hand_computed_and_stats():
    a = _logits([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])    # argmax a: 0, 1, 1
    b = _logits([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])    # argmax b: 0, 0, 1
    loss, stats = ops.cps_loss(a, b, backend="torch")

    def ce(row, k):
        return math.log(sum(math.exp(v) for v in row)) - row[k]
    expected = (ce([2, 0], 0) + ce([0, 1], 0) + ce([0, 3], 1)
                + ce([1, 0], 0) + ce([2, 0], 1) + ce([0, 1], 1)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    # background 0: pixel 0 (both background) not counted; pixel 1 disagrees; pixel 2 agrees.
    assert stats.tolist() == [0, 0, 1, 2]
    _, stats = ops.cps_loss(a, b, is_labeled=torch.tensor([True]), backend="torch")
    assert stats.tolist() == [1, 2, 0, 0]
    _, stats = ops.cps_loss(a, b, background_index=None, backend="torch")
    assert stats.tolist() == [0, 0, 2, 3]


def test_cps_loss_gradient_has_no_path_through_the_argmax():
    a = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    loss, _ = ops.cps_loss(a, b, backend="torch")
    loss.backward()
    pa, pb = a.argmax(1), b.argmax(1)
    exp_ga = (torch.softmax(a, 1) - torch.nn.functional.one_hot(pb, 3).permute(0, 3, 1, 2)) / 4
    assert torch.allclose(a.grad, exp_ga.detach())
    assert pa.shape == pb.shape


def test_confusion_matrix():
    pred = torch.tensor([[[0, 1, 1, 2]]])
    target = torch.tensor([[[0, 1, 2, 255]]])
    cm = ops.confusion_matrix(pred, target, 3, backend="torch")
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]


def test_dispatch_errors():
    x, t = torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ConfigError, match="backend 'nope'"):
        ops.cross_entropy(x, t, backend="nope")
    with pytest.raises(ValueError, match="target shape"):
        ops.cross_entropy(x, t[:, :1])
    with pytest.raises(ValueError, match="outside"):
        ops.cross_entropy(x, t + 3)
    with pytest.raises(ValueError, match="not a float"):
        ops.cross_entropy(x.long(), t)
    with pytest.raises(ConfigError, match="cannot run|unavailable"):
        ops.cross_entropy(x, t, backend="cuda")
