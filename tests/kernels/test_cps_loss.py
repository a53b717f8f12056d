"""Fused Triton CPS loss vs the eager reference (fp64): loss, both gradients, agreement
counts, under TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch

from kernel_testutil import (DTYPES, assert_grad_close, assert_loss_close, fresh_generator,
                             logits, need_compiled_triton, need_triton)

from cps_fast import ops
from cps_fast.kernels.cps_loss import cps_loss_reference


@pytest.fixture(autouse=True)
def _triton():
    need_triton()


def _ref(a, b, valid, lab, bg=0, grad_out=1.0, to64=True):
    a = (a.double() if to64 else a).detach().clone().requires_grad_(True)
    b = (b.double() if to64 else b).detach().clone().requires_grad_(True)
    loss, stats = cps_loss_reference(a, b, valid, lab, bg)
    (loss * grad_out).backward()
    return loss.detach(), stats, a.grad, b.grad


def _run(a, b, valid, lab, bg=0, grad_out=1.0):
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    loss, stats = ops.cps_loss(a, b, valid, lab, bg, backend="triton")
    loss.backward(torch.tensor(grad_out, dtype=a.dtype))
    return loss.detach(), stats, a.grad, b.grad


@pytest.mark.parametrize("c", [19, 21, 2])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("layouts", ["nchw", "nhwc", "mixed"])
def test_matches_reference(c, dt, layouts):
    gen, seed = fresh_generator()
    dtype = DTYPES[dt]
    a, _ = logits(gen, 3, c, 7, 13, dtype, channels_last=layouts in ("nhwc", "mixed"))
    b, _ = logits(gen, 3, c, 7, 13, dtype, channels_last=layouts == "nhwc")
    valid = torch.rand(3, 7, 13, generator=gen) > 0.25
    lab = torch.tensor([True, False, True])
    g_out = 1.0 + torch.rand((), generator=gen).item()
    loss, stats, ga, gb = _run(a, b, valid, lab, grad_out=g_out)
    rl, rs, rga, rgb = _ref(a, b, valid, lab, grad_out=g_out)
    _, _, ega, egb = _ref(a, b, valid, lab, grad_out=g_out, to64=False)   # eager, same dtype
    assert loss.dtype == dtype and stats.dtype == torch.int64
    assert_loss_close(loss, rl, dtype, "loss", seed)
    assert stats.tolist() == rs.tolist(), f"stats {stats.tolist()} vs {rs.tolist()} (seed {seed})"
    assert_grad_close(ga, rga, ega, dtype, "grad_a", seed)
    assert_grad_close(gb, rgb, egb, dtype, "grad_b", seed)
    assert ga.stride() == a.stride() and gb.stride() == b.stride()


@pytest.mark.parametrize("valid_kind", [None, "bool", "uint8"])
@pytest.mark.parametrize("lab_kind", [None, "bool", "int"])
@pytest.mark.parametrize("bg", [0, None, 3])
def test_optional_inputs(valid_kind, lab_kind, bg):
    gen, seed = fresh_generator()
    a, _ = logits(gen, 2, 5, 6, 9, torch.float32, scale=1.0)
    b, _ = logits(gen, 2, 5, 6, 9, torch.float32, scale=1.0)
    valid = None
    if valid_kind:
        valid = torch.rand(2, 6, 9, generator=gen) > 0.3
        valid = valid if valid_kind == "bool" else valid.to(torch.uint8)
    lab = None if lab_kind is None else torch.tensor([1, 0])
    lab = lab if lab_kind != "bool" or lab is None else lab.bool()
    loss, stats, ga, gb = _run(a, b, valid, lab, bg)
    rl, rs, rga, rgb = _ref(a, b, None if valid is None else valid.bool(), lab, bg)
    assert abs(loss.item() - rl.item()) < 1e-5, seed
    assert stats.tolist() == rs.tolist(), seed
    assert (ga.double() - rga).abs().max() < 1e-7 and (gb.double() - rgb).abs().max() < 1e-7, seed


def test_argmax_ties_lowest_index():
    """Integer logits in a tiny range: many rows with tied maxima; the pseudo-label, the
    gradient and the agreement counts must follow torch.argmax (lowest index)."""
    gen, seed = fresh_generator()
    a = torch.randint(0, 3, (2, 21, 7, 13), generator=gen).float()
    b = torch.randint(0, 3, (2, 21, 7, 13), generator=gen).float()
    b[:, :, :2] = a[:, :, :2]                       # identical rows: ties on both sides
    loss, stats, ga, gb = _run(a, b, None, torch.tensor([True, False]))
    rl, rs, rga, rgb = _ref(a, b, None, torch.tensor([True, False]))
    assert stats.tolist() == rs.tolist(), seed
    assert abs(loss.item() - rl.item()) < 1e-5, seed
    assert (ga.double() - rga).abs().max() < 1e-7 and (gb.double() - rgb).abs().max() < 1e-7, seed


@pytest.mark.parametrize("block_p,tiles", [(16, 1), (16, 3), (32, 2)])
def test_every_block_size(block_p, tiles):
    from cps_fast.kernels import cps_loss as mod
    gen, seed = fresh_generator()
    a, _ = logits(gen, 3, 19, 9, 11, torch.float32)
    b, _ = logits(gen, 3, 19, 9, 11, torch.float32, channels_last=True)
    valid = torch.rand(3, 9, 11, generator=gen) > 0.2
    lab = torch.tensor([False, True, True])
    loss, stats, ga, gb, inv = mod._cps_impl(a, b, valid, lab, 0, True, block_p=block_p, tiles=tiles)
    rl, rs, rga, rgb = _ref(a, b, valid, lab)
    assert abs(loss.item() - rl.item()) < 1e-5, seed
    assert stats.tolist() == rs.tolist(), seed
    assert (ga.double() * inv.item() - rga).abs().max() < 1e-7, seed
    assert (gb.double() * inv.item() - rgb).abs().max() < 1e-7, seed


def test_extreme_logits_no_nan():
    gen, seed = fresh_generator()
    a = (torch.randint(0, 2, (2, 21, 7, 13), generator=gen) * 2 - 1).float() * 1e4
    b = (torch.randint(0, 2, (2, 21, 7, 13), generator=gen) * 2 - 1).float() * 1e4
    loss, stats, ga, gb = _run(a, b, None, None)
    rl, rs, rga, rgb = _ref(a, b, None, None)
    assert torch.isfinite(loss) and torch.isfinite(ga).all() and torch.isfinite(gb).all(), seed
    assert abs(loss.item() - rl.item()) <= 1e-5 * max(1.0, rl.item()), seed
    assert stats.tolist() == rs.tolist(), seed
    assert (ga.double() - rga).abs().max() < 1e-6, seed


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_all_invalid_gives_zero(dt):
    gen, _ = fresh_generator()
    a, _ = logits(gen, 2, 19, 7, 13, DTYPES[dt])
    b, _ = logits(gen, 2, 19, 7, 13, DTYPES[dt])
    valid = torch.zeros(2, 7, 13, dtype=torch.bool)
    loss, stats, ga, gb = _run(a, b, valid, torch.tensor([True, False]))
    assert loss.item() == 0.0 and stats.tolist() == [0, 0, 0, 0]
    assert (ga == 0).all() and (gb == 0).all()


def test_deterministic_and_shape_checks():
    gen, _ = fresh_generator()
    a, _ = logits(gen, 2, 21, 9, 11, torch.float32)
    b, _ = logits(gen, 2, 21, 9, 11, torch.float32)
    r1 = torch.ops.cps_fast.cps_loss_triton(a, b, None, None, 0, True)
    r2 = torch.ops.cps_fast.cps_loss_triton(a, b, None, None, 0, True)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    with pytest.raises(ValueError, match="valid shape"):
        ops.cps_loss(a, b, torch.ones(2, 9, 10, dtype=torch.bool), backend="triton")
    with pytest.raises(ValueError, match="must match"):
        ops.cps_loss(a, b.half(), backend="triton")
    with pytest.raises(ValueError, match="float64"):
        ops.cps_loss(a.double(), b.double(), backend="triton")


def test_no_grad_skips_the_gradient_and_fp16():
    gen, seed = fresh_generator()
    a, _ = logits(gen, 2, 21, 7, 13, torch.float16)
    b, _ = logits(gen, 2, 21, 7, 13, torch.float16, channels_last=True)
    lab = torch.tensor([True, False])
    with torch.no_grad():
        loss, stats = ops.cps_loss(a, b, None, lab, backend="triton")
    rl, rs, rga, rgb = _ref(a, b, None, lab)
    assert_loss_close(loss, rl, torch.float16, "no-grad loss", seed)
    assert stats.tolist() == rs.tolist(), seed
    out = torch.ops.cps_fast.cps_loss_triton(a, b, None, lab, 0, False)
    assert out[2].numel() == 0 and out[3].numel() == 0          # nothing written
    l16, s16, ga, gb = _run(a, b, None, lab)                     # fp16 with gradients
    _, _, ega, egb = _ref(a, b, None, lab, to64=False)
    assert_grad_close(ga, rga, ega, torch.float16, "fp16 grad_a", seed)
    assert_grad_close(gb, rgb, egb, torch.float16, "fp16 grad_b", seed)


def test_opcheck():
    gen, _ = fresh_generator()
    a, _ = logits(gen, 2, 3, 3, 5, torch.float32)
    b, _ = logits(gen, 2, 3, 3, 5, torch.float32)
    a.requires_grad_(True)
    b.requires_grad_(True)
    valid = torch.rand(2, 3, 5, generator=gen) > 0.3
    torch.library.opcheck(torch.ops.cps_fast.cps_loss_triton.default,
                          (a, b, valid, torch.tensor([True, False]), 0, True))


# ----------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 21, 512, 512), (16, 19, 800, 800)], ids=["voc", "cityscapes"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_real_shapes(shape, channels_last):
    need_compiled_triton()
    gen, seed = fresh_generator()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    a = torch.randn(shape, generator=gen).mul_(3).to("cuda", torch.bfloat16).contiguous(memory_format=fmt)
    b = torch.randn(shape, generator=gen).mul_(3).to("cuda", torch.bfloat16).contiguous(memory_format=fmt)
    n, _, h, w = shape
    valid = (torch.rand(n, h, w, generator=gen) > 0.1).cuda()
    lab = (torch.arange(n) < n // 2).cuda()
    loss, stats, ga, gb = _run(a, b, valid, lab)
    rl, rs, rga, rgb = _ref(a.float(), b.float(), valid, lab, to64=False)
    assert abs(loss.float().item() - rl.item()) < 1e-2 * max(1, rl.item()), seed
    assert stats.tolist() == rs.tolist(), seed
    for g, r in ((ga, rga), (gb, rgb)):
        assert (g.float() - r).abs().max().item() < 1e-2 * r.abs().max().item(), seed
