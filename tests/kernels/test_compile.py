"""The Triton ops under torch.compile: traced whole (no graph break), through their fake
and autograd registrations, matching eager. backend="aot_eager" keeps it quick on the CPU
(no C++ compile); the kernels still run in the interpreter."""
from __future__ import annotations

import pytest
import torch

from kernel_testutil import fresh_generator, labels, logits, need_triton



@pytest.fixture(autouse=True)
def _triton():
    need_triton()


def test_all_three_ops_in_one_compiled_graph():
    gen, seed = fresh_generator()
    a, _ = logits(gen, 2, 19, 5, 7, torch.float32)
    b, _ = logits(gen, 2, 19, 5, 7, torch.float32, channels_last=True)
    t = labels(gen, 2, 19, 5, 7)
    valid = t != 255
    lab = torch.tensor([True, False])

    from cps_fast.kernels.registry import (cps_loss_triton, cross_entropy_triton,
                                           ohem_cross_entropy_triton)

    # The backend implementations directly: cps_fast.ops' label-value check on CPU tensors
    # (a data-dependent branch) would stop fullgraph tracing here; it does not run on CUDA.
    def step(a, b):
        cps, stats = cps_loss_triton(a, b, valid, lab)
        sup = cross_entropy_triton(a, t)
        ohem = ohem_cross_entropy_triton(b, t, 0.1, 20)
        return sup + ohem + 1.5 * cps, stats

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        aa = a.clone().requires_grad_(True)
        bb = b.clone().requires_grad_(True)
        loss, stats = fn(aa, bb)
        loss.backward()
        results.append((loss.detach(), stats, aa.grad, bb.grad))
    (l0, s0, ga0, gb0), (l1, s1, ga1, gb1) = results
    assert torch.equal(s0, s1), seed
    assert abs(l0.item() - l1.item()) < 1e-6, seed
    assert torch.allclose(ga0, ga1, atol=1e-7) and torch.allclose(gb0, gb1, atol=1e-7), seed
