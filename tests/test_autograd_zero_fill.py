"""The loss ops' backward allocates no zero gradient for the outputs that get none.

The fused ops return extra outputs (the stored per-pixel gradient, 1/count, the agreement
stats) that are marked non-differentiable. By default autograd would still hand backward
a zero tensor for each of them -- the size of the logits for the stored gradients, hundreds
of MB a step at the VOC shape. ``ctx.set_materialize_grads(False)`` stops that; the
backward then sees None for those outputs. Checked by recording every op the backward
dispatches: without the setting, an ``aten.zeros`` of the logits' shape appears.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cps_fast import ops
from cps_fast.kernels.cps_loss import cps_loss_reference
from cps_fast.kernels.cross_entropy import cross_entropy_reference
from cps_fast.kernels.ohem_cross_entropy import ohem_cross_entropy_reference

ZERO_FACTORIES = {"aten.zeros", "aten.zeros_like", "aten.new_zeros", "aten.full",
                  "aten.full_like", "aten.new_full", "aten.fill_", "aten.zero_"}


class _Zeros(TorchDispatchMode):
    """Records the shapes of the zero-filled tensors created while it is active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name in ZERO_FACTORIES and torch.is_tensor(out):
            self.shapes.append(tuple(out.shape))
        return out


def _skip_unavailable(backend, op):
    if backend not in ops.available_backends(op, "cpu"):
        pytest.skip(f"backend {backend} cannot run {op} here")


SHAPE = (2, 5, 6, 7)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_cross_entropy_backward_allocates_no_zero_logits(backend):
    _skip_unavailable(backend, "cross_entropy")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, requires_grad=True)
    t = torch.randint(0, SHAPE[1], (SHAPE[0],) + SHAPE[2:], generator=g)
    t[0, 0] = 255
    loss = ops.cross_entropy(x, t, backend=backend)
    with _Zeros() as z:
        loss.backward()
    assert SHAPE not in z.shapes, z.shapes
    # ... and the gradient is still the right one.
    x64 = x.detach().double().requires_grad_(True)
    cross_entropy_reference(x64, t).backward()
    assert (x.grad.double() - x64.grad).abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_ohem_backward_allocates_no_zero_logits(backend):
    _skip_unavailable(backend, "ohem_cross_entropy")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=g, requires_grad=True)
    t = torch.randint(0, SHAPE[1], (SHAPE[0],) + SHAPE[2:], generator=g)
    loss = ops.ohem_cross_entropy(x, t, 0.7, 10, backend=backend)
    with _Zeros() as z:
        loss.backward()
    assert SHAPE not in z.shapes, z.shapes
    x64 = x.detach().double().requires_grad_(True)
    ohem_cross_entropy_reference(x64, t, 0.7, 10).backward()
    assert (x.grad.double() - x64.grad).abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("need", ["both", "a_only"])
def test_cps_loss_backward_allocates_no_zero_logits(backend, need):
    _skip_unavailable(backend, "cps_loss")
    g = torch.Generator().manual_seed(1)
    a = torch.randn(SHAPE, generator=g, requires_grad=True)
    b = torch.randn(SHAPE, generator=g, requires_grad=need == "both")
    valid = torch.rand((SHAPE[0],) + SHAPE[2:], generator=g) > 0.2
    loss, stats = ops.cps_loss(a, b, valid, torch.tensor([True, False]), backend=backend)
    with _Zeros() as z:
        (2.0 * loss).backward()
    assert SHAPE not in z.shapes, z.shapes
    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(need == "both")
    ref, ref_stats = cps_loss_reference(a64, b64, valid, torch.tensor([True, False]))
    (2.0 * ref).backward()
    assert torch.equal(stats, ref_stats)
    assert (a.grad.double() - a64.grad).abs().max().item() < 1e-6
    if need == "both":
        assert (b.grad.double() - b64.grad).abs().max().item() < 1e-6
    else:
        assert b.grad is None
