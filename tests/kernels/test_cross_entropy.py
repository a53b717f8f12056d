"""Fused Triton cross-entropy vs the eager reference (fp64), under TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch

from kernel_testutil import (DTYPES, assert_grad_close, assert_loss_close, fresh_generator,
                             labels, logits, need_compiled_triton, need_triton)

from cps_fast import ops
from cps_fast.kernels.cross_entropy import cross_entropy_reference


@pytest.fixture(autouse=True)
def _triton():
    need_triton()


def _ref(x64, t, ignore_index=255, grad_out=1.0):
    x = x64.detach().clone().requires_grad_(True)
    loss = cross_entropy_reference(x, t, ignore_index)
    (loss * grad_out).backward()
    return loss.detach(), x.grad


def _eager_grad(x, t, grad_out):
    x = x.detach().clone().requires_grad_(True)
    (cross_entropy_reference(x, t) * grad_out).backward()
    return x.grad


@pytest.mark.parametrize("c", [19, 21, 2])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(c, dt, channels_last):
    gen, seed = fresh_generator()
    dtype = DTYPES[dt]
    x, x64 = logits(gen, 2, c, 7, 13, dtype, channels_last)
    t = labels(gen, 2, c, 7, 13)
    g_out = 1.0 + torch.rand((), generator=gen).item()
    xt = x.detach().clone().requires_grad_(True)
    loss = ops.cross_entropy(xt, t, backend="triton")
    loss.backward(torch.tensor(g_out, dtype=dtype))
    ref_loss, ref_grad = _ref(x64, t, grad_out=g_out)
    assert loss.dtype == dtype and loss.dim() == 0
    assert_loss_close(loss, ref_loss, dtype, "loss", seed)
    assert xt.grad.dtype == dtype
    assert xt.grad.is_contiguous(memory_format=torch.channels_last if channels_last
                                 else torch.contiguous_format)
    assert_grad_close(xt.grad, ref_grad, _eager_grad(x, t, g_out), dtype, "grad", seed)


@pytest.mark.parametrize("block_p,tiles", [(16, 1), (16, 3), (32, 2)])
def test_every_block_size(block_p, tiles):
    """Several programs per image, tiles past the end of the image, partial tails."""
    from cps_fast.kernels import cross_entropy as mod
    gen, seed = fresh_generator()
    x, x64 = logits(gen, 3, 21, 9, 11, torch.float32)
    t = labels(gen, 3, 21, 9, 11, dtype=torch.uint8)
    loss, grad, inv = mod._ce_impl(x, t, 255, True, block_p=block_p, tiles=tiles)
    ref_loss, ref_grad = _ref(x64, t.long())
    assert abs(loss.item() - ref_loss.item()) < 1e-5, seed
    assert (grad.double() * inv.item() - ref_grad).abs().max() < 1e-7, seed


@pytest.mark.parametrize("tdtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_target_dtypes(tdtype):
    gen, seed = fresh_generator()
    x, x64 = logits(gen, 2, 19, 5, 7, torch.float32)
    t = labels(gen, 2, 19, 5, 7, dtype=tdtype)
    loss = ops.cross_entropy(x, t, backend="triton")
    assert abs(loss.item() - _ref(x64, t.long())[0].item()) < 1e-5, seed


def test_extreme_logits_no_nan():
    gen, seed = fresh_generator()
    x = (torch.randint(0, 2, (2, 21, 7, 13), generator=gen) * 2 - 1).float() * 1e4
    t = labels(gen, 2, 21, 7, 13)
    xt = x.clone().requires_grad_(True)
    loss = ops.cross_entropy(xt, t, backend="triton")
    loss.backward()
    ref_loss, ref_grad = _ref(x.double(), t)
    assert torch.isfinite(loss) and torch.isfinite(xt.grad).all(), seed
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1, ref_loss.item()), seed
    assert (xt.grad.double() - ref_grad).abs().max() < 1e-6, seed


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_all_ignored_gives_zero(dt):
    gen, _ = fresh_generator()
    x, _ = logits(gen, 2, 19, 7, 13, DTYPES[dt])
    x.requires_grad_(True)
    t = torch.full((2, 7, 13), 255, dtype=torch.int64)
    loss = ops.cross_entropy(x, t, backend="triton")
    loss.backward()
    assert loss.item() == 0.0
    assert (x.grad == 0).all()


def test_out_of_range_targets_are_ignored_in_the_kernel():
    """ops.py rejects them on CPU; the op itself must never read or write out of bounds."""
    gen, seed = fresh_generator()
    x, x64 = logits(gen, 2, 21, 7, 13, torch.float32)
    t = labels(gen, 2, 21, 7, 13)
    bad = torch.rand(2, 7, 13, generator=gen) < 0.3
    t_bad = t.clone()
    t_bad[bad] = torch.tensor([21, 31, 32, 300, -1, -7])[torch.arange(int(bad.sum())) % 6]
    loss, grad, inv = torch.ops.cps_fast.cross_entropy_triton(x, t_bad, 255, True)
    t_ref = torch.where(bad, torch.full_like(t, 255), t)
    ref_loss, ref_grad = _ref(x64, t_ref)
    assert abs(loss.item() - ref_loss.item()) < 1e-5, seed
    assert (grad.double() * inv.item() - ref_grad).abs().max() < 1e-7, seed
    with pytest.raises(ValueError, match="outside"):
        ops.cross_entropy(x, t_bad, backend="triton")


def test_other_ignore_index_and_strided_input():
    gen, seed = fresh_generator()
    big, _ = logits(gen, 2, 19, 8, 14, torch.float32)
    x = big[:, :, 1:, ::2]                      # neither NCHW- nor NHWC-contiguous: copied
    t = labels(gen, 2, 19, 7, 7, ignore_index=-100)
    xt = x.detach().clone().requires_grad_(True)
    xs = big.detach().clone().requires_grad_(True)
    loss = ops.cross_entropy(xs[:, :, 1:, ::2], t, ignore_index=-100, backend="triton")
    loss.backward()
    x64 = x.double().requires_grad_(True)
    ref = cross_entropy_reference(x64, t, ignore_index=-100)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5, seed
    assert (xs.grad[:, :, 1:, ::2].double() - x64.grad).abs().max() < 1e-7, seed
    del xt


def test_unsupported_inputs_raise_before_launch():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    t = torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="float64"):
        ops.cross_entropy(x, t, backend="triton")
    with pytest.raises(ValueError, match="target shape"):
        ops.cross_entropy(x.float(), t[:, :3], backend="triton")


def test_deterministic():
    gen, _ = fresh_generator()
    x, _ = logits(gen, 2, 21, 9, 11, torch.float32)
    t = labels(gen, 2, 21, 9, 11)
    a = torch.ops.cps_fast.cross_entropy_triton(x, t, 255, True)
    b = torch.ops.cps_fast.cross_entropy_triton(x, t, 255, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_no_grad_skips_the_gradient_and_fp16():
    gen, seed = fresh_generator()
    x, x64 = logits(gen, 2, 19, 7, 13, torch.float16, channels_last=True)
    t = labels(gen, 2, 19, 7, 13)
    with torch.no_grad():
        loss = ops.cross_entropy(x, t, backend="triton")
    ref_loss, ref_grad = _ref(x64, t, grad_out=1.0)
    assert_loss_close(loss, ref_loss, torch.float16, "no-grad loss", seed)
    assert torch.ops.cps_fast.cross_entropy_triton(x, t, 255, False)[1].numel() == 0
    xt = x.clone().requires_grad_(True)
    ops.cross_entropy(xt, t, backend="triton").backward()
    assert_grad_close(xt.grad, ref_grad, _eager_grad(x, t, 1.0), torch.float16, "fp16 grad", seed)


def test_opcheck():
    gen, _ = fresh_generator()
    x, _ = logits(gen, 1, 3, 3, 5, torch.float32)
    x.requires_grad_(True)
    t = labels(gen, 1, 3, 3, 5)
    torch.library.opcheck(torch.ops.cps_fast.cross_entropy_triton.default, (x, t, 255, True))


# ----------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 21, 512, 512), (16, 19, 800, 800)], ids=["voc", "cityscapes"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_real_shapes(shape, channels_last):
    need_compiled_triton()
    gen, seed = fresh_generator()
    n, c, h, w = shape
    x = torch.randn(shape, generator=gen).mul_(3).to("cuda", torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = labels(gen, n, c, h, w).cuda()
    xt = x.detach().clone().requires_grad_(True)
    loss = ops.cross_entropy(xt, t, backend="triton")
    loss.backward()
    xr = x.detach().float().requires_grad_(True)
    ref = cross_entropy_reference(xr, t)
    ref.backward()
    assert abs(loss.float().item() - ref.item()) < 1e-2 * max(1, ref.item()), seed
    assert (xt.grad.float() - xr.grad).abs().max().item() < 1e-2 * xr.grad.abs().max().item(), seed
