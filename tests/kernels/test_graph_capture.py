"""GPU only: the Triton ops never synchronise with the host, so forward + backward of all
three can be captured in one CUDA graph and replayed on fresh inputs; and they compile
whole under torch.compile (inductor). Skipped without CUDA (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from kernel_testutil import fresh_generator, need_compiled_triton, need_triton


def _loss(a, b, t, valid, lab):
    from cps_fast import ops
    cps, stats = ops.cps_loss(a, b, valid, lab, backend="triton")
    sup = ops.cross_entropy(a, t, backend="triton")
    ohem = ops.ohem_cross_entropy(b, t, 0.7, 2000, backend="triton")
    return sup + ohem + 1.5 * cps, stats


def _inputs(gen, shape=(4, 19, 64, 96), dtype=torch.bfloat16):
    n, c, h, w = shape
    a = torch.randn(shape, generator=gen).mul_(3).to("cuda", dtype)
    b = torch.randn(shape, generator=gen).mul_(3).to("cuda", dtype)
    a = a.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, c, (n, h, w), generator=gen)
    t[torch.rand(n, h, w, generator=gen) < 0.1] = 255
    return a, b, t.to("cuda", torch.uint8)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    need_triton()
    need_compiled_triton()
    gen, seed = fresh_generator()
    a0, b0, t0 = _inputs(gen)
    static_a = a0.clone().requires_grad_(True)
    static_b = b0.clone().requires_grad_(True)
    static_t = t0.clone()
    valid = static_t != 255
    lab = torch.arange(4, device="cuda") < 2

    def step():
        static_a.grad = None
        static_b.grad = None
        loss, stats = _loss(static_a, static_b, static_t, valid, lab)
        loss.backward()
        return loss.detach(), stats

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                 # warm-up: JIT-compile every kernel
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_a.grad = None
    static_b.grad = None
    with torch.cuda.graph(graph):
        loss_g, stats_g = _loss(static_a, static_b, static_t, valid, lab)
        loss_g.backward()
    for _ in range(2):                            # fresh inputs copied into the buffers
        a1, b1, t1 = _inputs(gen)
        with torch.no_grad():
            static_a.copy_(a1)
            static_b.copy_(b1)
            static_t.copy_(t1)
            valid.copy_(t1 != 255)
        graph.replay()
        ga, gb = static_a.grad.clone(), static_b.grad.clone()
        ea = a1.clone().requires_grad_(True)
        eb = b1.clone().requires_grad_(True)
        loss_e, stats_e = _loss(ea, eb, t1, t1 != 255, lab)
        loss_e.backward()
        torch.cuda.synchronize()
        assert torch.equal(stats_g, stats_e), seed
        assert abs(loss_g.float().item() - loss_e.float().item()) < 1e-2, seed
        assert torch.allclose(ga.float(), ea.grad.float(), atol=1e-6, rtol=1e-2), seed
        assert torch.allclose(gb.float(), eb.grad.float(), atol=1e-6, rtol=1e-2), seed


@pytest.mark.gpu
def test_torch_compile_inductor_fullgraph():
    need_triton()
    need_compiled_triton()
    gen, seed = fresh_generator()
    a0, b0, t = _inputs(gen, (2, 21, 32, 48))
    valid = t != 255
    lab = torch.tensor([True, False], device="cuda")
    # the backend implementations directly: cps_fast.ops checks label values on CPU only
    from cps_fast.kernels.registry import (cps_loss_triton, cross_entropy_triton,
                                           ohem_cross_entropy_triton)

    def f(a, b):
        cps, stats = cps_loss_triton(a, b, valid, lab)
        return (cross_entropy_triton(a, t) + ohem_cross_entropy_triton(b, t, 0.7, 500)
                + 1.5 * cps), stats

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    out = []
    for fn in (f, cf):
        a = a0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        loss, stats = fn(a, b)
        loss.backward()
        out.append((loss.float().item(), stats, a.grad, b.grad))
    assert abs(out[0][0] - out[1][0]) < 1e-2, seed
    assert torch.equal(out[0][1], out[1][1]), seed
    assert torch.allclose(out[0][2].float(), out[1][2].float(), atol=1e-6, rtol=1e-2), seed
    assert torch.allclose(out[0][3].float(), out[1][3].float(), atol=1e-6, rtol=1e-2), seed
