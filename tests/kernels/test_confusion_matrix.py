"""Fused argmax + confusion-matrix Triton op vs the int reference (argmax of the fp64 copy),
under TRITON_INTERPRET=1. Integer results: every comparison is exact."""
from __future__ import annotations

import pytest
import torch

from kernel_testutil import DTYPES, fresh_generator, labels, logits, need_compiled_triton, need_triton

from cps_fast import ops
from cps_fast.kernels.confusion_matrix import confusion_matrix_reference, hist_constexprs


@pytest.fixture(autouse=True)
def _triton():
    need_triton()


def _triton_cm(x, t, c, ignore_index=255):
    return ops.confusion_matrix(x, t, c, ignore_index, backend="triton")


def _check(x, t, c, seed, ignore_index=255, what=""):
    """The op against the reference on the fp64 copy (the same values: the cast is exact)."""
    got = _triton_cm(x, t, c, ignore_index)
    ref = confusion_matrix_reference(x.double() if x.dim() == 4 else x, t, c, ignore_index)
    assert got.dtype == torch.int64 and got.shape == (c, c), (got.dtype, got.shape)
    assert torch.equal(got, ref), f"{what} differs from the reference (seed {seed})"
    return got


@pytest.mark.parametrize("c", [2, 19, 21, 45, 46, 150, 256])
@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_logits_match_reference(c, dt, channels_last):
    """Odd shapes, 20 % ignored pixels; C=45 is the largest register histogram (2026 of
    2048 bins), C >= 46 counts with one atomic per pixel."""
    gen, seed = fresh_generator()
    x, _ = logits(gen, 2, c, 7, 13, DTYPES[dt], channels_last)
    t = labels(gen, 2, c, 7, 13)
    cm = _check(x, t, c, seed, what=f"C={c} {dt} cl={channels_last}")
    assert int(cm.sum()) == int(((t != 255)).sum()), seed     # every valid pixel counted once


@pytest.mark.parametrize("c", [3, 21])
def test_ties_go_to_the_lowest_class(c):
    """Logits from {0, 1, 2} (many ties), whole rows equal, and a hand-made row."""
    gen, seed = fresh_generator()
    x = torch.randint(0, 3, (2, c, 9, 11), generator=gen).float()
    x[0, :, 0, :] = 1.5                                       # a fully tied image row
    t = labels(gen, 2, c, 9, 11)
    _check(x, t, c, seed, what="ties")
    _check(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), t, c, seed,
           what="bf16 ties, channels_last")
    row = torch.tensor([0.0, 2.0, 2.0, -1.0][:c] + [0.0] * max(0, c - 4)).reshape(1, c, 1, 1)
    got = _triton_cm(row, torch.tensor([[[0]]]), c)
    assert got[0].nonzero().flatten().tolist() == [1], got[0]


def test_nan_inf_and_signed_zero_follow_torch_argmax():
    """torch.argmax treats NaN as the largest value (the first NaN wins); +-inf, huge
    values and -0.0 == +0.0 (a tie, lowest index) are ordinary numbers."""
    gen, seed = fresh_generator()
    c = 21
    x = torch.randn(3, c, 8, 9, generator=gen) * 3
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 0.0,
                            -0.0])
    pick = torch.rand(x.shape, generator=gen) < 0.15
    x[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=gen)]
    x[2, :, 0, 0] = float("nan")                              # an all-NaN pixel -> class 0
    x[2, :, 0, 1] = float("-inf")                             # an all -inf pixel -> class 0
    x[2, :, 0, 2] = 0.0
    x[2, 5, 0, 2] = -0.0                                      # -0 ties with +0
    t = labels(gen, 3, c, 8, 9, ignore_frac=0.0)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dt)
        _check(xd, t, c, seed, what=f"NaN/inf {dt}")
        _check(xd.contiguous(memory_format=torch.channels_last), t, c, seed,
               what=f"NaN/inf {dt} channels_last")
    # The semantics themselves, by hand: [1, NaN, 5, NaN] -> 1 (the first NaN).
    row = torch.tensor([1.0, float("nan"), 5.0, float("nan")]).reshape(1, 4, 1, 1)
    for backend in ("torch", "triton"):
        cm = ops.confusion_matrix(row, torch.tensor([[[2]]]), 4, backend=backend)
        assert cm[2].tolist() == [0, 1, 0, 0], (backend, cm)


def test_extreme_logits():
    gen, seed = fresh_generator()
    x = (torch.randint(0, 2, (2, 19, 7, 13), generator=gen) * 2 - 1).float() * 1e4
    x += torch.randn(x.shape, generator=gen)                  # break most ties
    t = labels(gen, 2, 19, 7, 13)
    _check(x, t, 19, seed, what="|x| ~ 1e4")
    _check(x * 1e34, t, 19, seed, what="|x| ~ 1e38")


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_all_ignored_is_zero(dt):
    gen, _ = fresh_generator()
    x, _ = logits(gen, 2, 21, 7, 13, DTYPES[dt])
    t = torch.full((2, 7, 13), 255, dtype=torch.uint8)
    assert int(_triton_cm(x, t, 21).abs().sum()) == 0
    assert int(_triton_cm(x.argmax(1), t, 21).abs().sum()) == 0


@pytest.mark.parametrize("pdtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("tdtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("c", [6, 21, 64])
def test_predictions_match_reference(pdtype, tdtype, c):
    """Integer predictions (N, H, W), every label dtype; C=64 uses per-pixel atomics."""
    gen, seed = fresh_generator()
    pred = torch.randint(0, c, (3, 17, 23), generator=gen).to(pdtype)
    t = labels(gen, 3, c, 17, 23, dtype=tdtype)
    _check(pred, t, c, seed, what=f"pred {pdtype} target {tdtype}")


@pytest.mark.parametrize("c", [21, 64])
def test_out_of_range_labels_and_predictions_are_left_out(c):
    """As the reference: targets outside [0, C) (other than ignore_index) and predictions
    outside [0, C) are not counted -- never used as an address."""
    gen, seed = fresh_generator()
    x, _ = logits(gen, 2, c, 7, 13, torch.float32)
    t = labels(gen, 2, c, 7, 13, dtype=torch.int32)
    bad = torch.rand(2, 7, 13, generator=gen) < 0.3
    t[bad] = torch.tensor([c, c + 9, 300, -1, -7, 2 ** 20], dtype=torch.int32)[
        torch.arange(int(bad.sum())) % 6]
    _check(x, t, c, seed, what="targets out of range")
    pred = torch.randint(-3, c + 3, (2, 7, 13), generator=gen, dtype=torch.int32)
    _check(pred, t, c, seed, what="predictions and targets out of range")


def test_other_ignore_index_and_ignore_inside_the_classes():
    gen, seed = fresh_generator()
    x, _ = logits(gen, 2, 19, 7, 13, torch.float32)
    t = labels(gen, 2, 19, 7, 13, ignore_index=-100)
    _check(x, t, 19, seed, ignore_index=-100, what="ignore -100")
    op = torch.ops.cps_fast.confusion_matrix_triton
    t2 = labels(gen, 2, 19, 7, 13, ignore_frac=0.0)           # class 4 ignored, as the reference
    assert torch.equal(op(x, t2, 19, 4), confusion_matrix_reference(x, t2, 19, 4)), seed


@pytest.mark.parametrize("block_p,tiles", [(16, 1), (16, 3), (32, 2)])
@pytest.mark.parametrize("c", [21, 64])
def test_every_block_size(block_p, tiles, c):
    """Several programs per image, tiles past the end of the image, partial tails; the
    register histogram (C=21) and the per-pixel atomics (C=64)."""
    from cps_fast.kernels.confusion_matrix import _cm_impl
    gen, seed = fresh_generator()
    x, _ = logits(gen, 3, c, 9, 11, torch.float32)
    t = labels(gen, 3, c, 9, 11, dtype=torch.uint8)
    ref = confusion_matrix_reference(x.double(), t, c)
    assert torch.equal(_cm_impl(x, t, c, 255, block_p=block_p, tiles=tiles), ref), seed
    pred = x.argmax(1)
    assert torch.equal(_cm_impl(pred, t, c, 255, block_p=block_p, tiles=tiles), ref), seed


def test_histogram_variant_choice():
    assert hist_constexprs(21) == dict(USE_HIST=True, HIST_BINS=512)
    assert hist_constexprs(45) == dict(USE_HIST=True, HIST_BINS=2048)
    assert hist_constexprs(46)["USE_HIST"] is False


def test_strided_input_and_empty_batch():
    gen, seed = fresh_generator()
    big, _ = logits(gen, 2, 19, 8, 14, torch.float32)
    x = big[:, :, 1:, ::2]                      # neither NCHW- nor NHWC-contiguous: copied
    t = labels(gen, 2, 19, 7, 7)
    _check(x, t, 19, seed, what="strided")
    empty = _triton_cm(torch.zeros(0, 19, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long), 19)
    assert empty.shape == (19, 19) and int(empty.abs().sum()) == 0


def test_unsupported_inputs_raise_before_launch():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    t = torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="float64"):
        _triton_cm(x, t, 3)
    with pytest.raises(ValueError, match="3 classes, num_classes=4"):
        _triton_cm(x.float(), t, 4)
    with pytest.raises(ValueError, match="target shape"):
        _triton_cm(x.float(), t[:, :3], 3)
    with pytest.raises(ValueError, match="not an integer type"):
        _triton_cm(x.float(), t.float(), 3)
    with pytest.raises(ValueError, match="not an integer type"):
        _triton_cm(torch.zeros(1, 4, 4), t, 3)


def test_registered_and_deterministic():
    from cps_fast.kernels import registry
    assert "triton" in ops.available_backends("confusion_matrix", "cpu")
    assert registry.OP_NAMES["confusion_matrix"] == "cps_fast::confusion_matrix_triton"
    gen, _ = fresh_generator()
    x, _ = logits(gen, 2, 21, 9, 11, torch.bfloat16)
    t = labels(gen, 2, 21, 9, 11)
    assert torch.equal(_triton_cm(x, t, 21), _triton_cm(x, t, 21))


def test_opcheck():
    gen, _ = fresh_generator()
    x, _ = logits(gen, 1, 3, 3, 5, torch.float32)
    t = labels(gen, 1, 3, 3, 5)
    torch.library.opcheck(torch.ops.cps_fast.confusion_matrix_triton.default, (x, t, 3, 255))
    torch.library.opcheck(torch.ops.cps_fast.confusion_matrix_triton.default,
                          (x.argmax(1), t, 3, 255))


# ----------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 19, 1024, 2048), (2, 21, 500, 375), (1, 150, 512, 683)],
                         ids=["cityscapes", "voc", "ade"])
def test_gpu_real_shapes(shape, dt, channels_last):
    need_compiled_triton()
    gen, seed = fresh_generator()
    n, c, h, w = shape
    x = (torch.randn(shape, generator=gen) * 3).to(DTYPES[dt])
    x[:, :, ::97, ::89] = float("nan")                       # NaN semantics on the device too
    t = labels(gen, n, c, h, w)
    ref = confusion_matrix_reference(x, t, c)
    xc = x.cuda()
    if channels_last:
        xc = xc.to(memory_format=torch.channels_last)
    got = ops.confusion_matrix(xc, t.cuda(), c, backend="triton")
    assert torch.equal(got.cpu(), ref), seed
    assert torch.equal(ops.confusion_matrix(xc, t.cuda(), c), got)   # auto picks triton


@pytest.mark.gpu
def test_gpu_graph_capture():
    """No host sync: the op captures into a CUDA graph and replays on new inputs."""
    need_compiled_triton()
    gen, seed = fresh_generator()
    x = torch.randn(2, 21, 256, 320, generator=gen).cuda()
    t = labels(gen, 2, 21, 256, 320).cuda()
    _triton_cm(x, t, 21)                                     # compile outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _triton_cm(x, t, 21)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _triton_cm(x, t, 21)
    x.copy_(torch.randn(x.shape, generator=gen).cuda())
    g.replay()
    assert torch.equal(out.cpu(), confusion_matrix_reference(x.cpu(), t.cpu(), 21)), seed
