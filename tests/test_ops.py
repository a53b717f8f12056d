"""The eager references (torch backend) against hand-computed values, and the dispatch."""

import math

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


# The reference against the official argsort code: tests/kernels/test_ohem_cross_entropy.py.


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
