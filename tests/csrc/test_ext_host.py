"""The host (C++) path of cps_fast._C against the eager references, computed in fp64.

Inputs are drawn in fp64, rounded to the tested dtype, and the reference sees the rounded
values in fp64: the comparison measures the kernel's own arithmetic.
"""
import pytest
import torch

from cps_fast import ops
from cps_fast.kernels.confusion_matrix import confusion_matrix_reference
from cps_fast.kernels.cps_loss import cps_loss_reference
from cps_fast.kernels.cross_entropy import cross_entropy_reference
from ext_helpers import load_ext
from ohem_oracle import check_backend, mixed_labels, ohem_oracle

pytestmark = pytest.mark.ext

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SHAPES = [(2, 19, 7, 9), (1, 2, 1, 1), (3, 21, 5, 13), (2, 19, 33, 31), (1, 2, 17, 3)]


@pytest.fixture(scope="module", autouse=True)
def ext():
    return load_ext()


def _logits(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x


def _target(shape, c, seed, ignore_frac=0.2, dtype=torch.int64):
    n, _, h, w = shape
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, c, (n, h, w), generator=g)
    t[torch.rand((n, h, w), generator=g) < ignore_frac] = 255
    return t.to(dtype)


def _close(a, b, tol, what):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = max(b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= tol * max(scale, 1.0) if a.dim() == 0 else err <= tol * scale, \
        f"{what}: max error {err:.3g} (scale {scale:.3g}, tol {tol})"


def _fwd_bwd(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    loss.float().backward()
    return out, x.grad


# ----------------------------------------------------------------------------- dispatch
def test_auto_on_cpu_is_the_host_path(ext):
    assert ops.resolve("cross_entropy", "auto", "cpu") is ext.cross_entropy
    assert "cpp" in ops.available_backends("cps_loss", "cpu")


# ----------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_matches_reference(shape, dtype):
    x = _logits(shape, dtype, seed=sum(shape))
    t = _target(shape, shape[1], seed=3)
    (loss), g = _fwd_bwd(ops.cross_entropy, x, t, backend="cpp")
    ref, g_ref = _fwd_bwd(cross_entropy_reference, x.double(), t)
    assert loss.dtype == dtype and loss.dim() == 0
    _close(loss, ref, TOL[dtype], "loss")
    assert g.dtype == dtype
    _close(g, g_ref, TOL[dtype], "grad")


@pytest.mark.parametrize("tdtype", [torch.uint8, torch.int32, torch.int16])
def test_cross_entropy_label_dtypes_and_channels_last(tdtype):
    shape = (2, 19, 6, 10)
    x = _logits(shape, torch.float32, seed=5).contiguous(memory_format=torch.channels_last)
    t = _target(shape, 19, seed=6, dtype=tdtype)
    loss, g = _fwd_bwd(ops.cross_entropy, x, t, backend="cpp")
    ref, g_ref = _fwd_bwd(cross_entropy_reference, x.double(), t.long())
    _close(loss, ref, 1e-5, "loss")
    _close(g, g_ref, 1e-5, "grad")


def test_cross_entropy_all_ignored_is_zero_not_nan():
    x = _logits((2, 5, 4, 4), torch.float32, seed=1)
    t = torch.full((2, 4, 4), 255)
    loss, g = _fwd_bwd(ops.cross_entropy, x, t, backend="cpp")
    assert loss.item() == 0.0
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_extreme_logits(dtype):
    shape = (2, 19, 5, 7)
    x = (torch.randint(0, 2, shape) * 2 - 1).double() * 1e4
    x[:, 3] += 1.0  # some pixels with a clear winner
    x = x.to(dtype)
    t = _target(shape, 19, seed=9)
    loss, g = _fwd_bwd(ops.cross_entropy, x, t, backend="cpp")
    ref, g_ref = _fwd_bwd(cross_entropy_reference, x.double(), t)
    assert torch.isfinite(loss) and torch.isfinite(g.float()).all()
    _close(loss, ref, 1e-6 if dtype == torch.float32 else 1e-2, "loss")
    _close(g, g_ref, TOL[dtype], "grad")


def test_cross_entropy_no_grad_path_and_fp64_falls_back():
    x = _logits((2, 4, 3, 3), torch.float32, seed=2)
    t = _target(x.shape, 4, seed=2)
    with torch.no_grad():
        a = ops.cross_entropy(x, t, backend="cpp")
    _close(a, cross_entropy_reference(x.double(), t), 1e-5, "loss")
    b = ops.cross_entropy(x.double(), t, backend="cpp")   # fp64: the reference runs
    assert b.dtype == torch.float64


def test_deterministic_across_thread_counts():
    x = _logits((4, 19, 40, 50), torch.float32, seed=4)
    t = _target(x.shape, 19, seed=4)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, ga = _fwd_bwd(ops.cross_entropy, x, t, backend="cpp")
        torch.set_num_threads(max(2, n))
        b, gb = _fwd_bwd(ops.cross_entropy, x, t, backend="cpp")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b) and torch.equal(ga, gb)


# ----------------------------------------------------------------------------- OHEM
# Per image, against the fp64 per-image oracle (tests/ohem_oracle.py) in three steps: the
# thresholds are exactly the rule on the path's own fp32 p (read back from its keys), its kept
# set differs from the fp64 one only next to a threshold, and loss and gradient match the
# oracle on its kept set.
def _ohem(x, t, thresh, min_kept, grad_out=1.0):
    """(loss, grad of grad_out * loss, key, threshold) through the registered op."""
    from cps_fast import ext as e
    xr = x.detach().clone().requires_grad_()
    loss, weight, _, key, thr = e._ohem_op(xr, t, float(thresh), int(min_kept), 255, True)
    (loss * grad_out).backward()
    assert weight.shape == thr.shape == (x.shape[0],) and key.shape == t.shape
    # the public op returns the same loss, in the logits dtype
    pub = ops.ohem_cross_entropy(x, t, thresh=thresh, min_kept=min_kept, backend="cpp")
    assert pub.dtype == x.dtype and float(pub) == float(loss.detach().to(x.dtype))
    return loss, xr.grad, key, thr


def _check_ohem(x, t, thresh, min_kept, what, grad_out=1.0):
    loss, g, key, thr = _ohem(x, t, thresh, min_kept, grad_out)
    return check_backend(x.double(), t, thresh, min_kept, loss, g, key, thr, x.dtype, what,
                         grad_out=grad_out), g, thr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("min_kept,thresh", [(40, 0.7), (40, 0.01), (10**6, 0.7), (0, 0.7),
                                             (1, 0.3), (100, 0.9), (153, 0.5), (154, 0.5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ohem_matches_the_per_image_oracle(dtype, min_kept, thresh, channels_last):
    # 9x17 = 153 px per image: ~122 valid, ~15 valid (fewer than min_kept 40: all kept), none
    # (an all-ignored image, out of the mean), ~122 again; 153 = H*W, 154 > H*W
    shape = (4, 19, 9, 17)
    x = _logits(shape, dtype, seed=min_kept % 1000 + 1, scale=2.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = mixed_labels(torch.Generator().manual_seed(7), 4, 19, 9, 17)
    o, _, _ = _check_ohem(x, t, thresh, min_kept, f"k={min_kept} thresh={thresh}", 1.5)
    assert not o.kept[2].any()


@pytest.mark.parametrize("min_kept", [1, 29, 30, 31, 90, 91, 92])
def test_ohem_min_kept_edges(min_kept):
    """Image 0: all 91 pixels valid; image 1: exactly 30. num_valid +- 1, H*W, > H*W."""
    g = torch.Generator().manual_seed(min_kept)
    x = _logits((2, 19, 7, 13), torch.float32, seed=min_kept)
    t = torch.randint(0, 19, (2, 7, 13), generator=g)
    t[1].view(-1)[torch.randperm(91, generator=g)[30:]] = 255
    o, _, thr = _check_ohem(x, t, 0.0, min_kept, f"k={min_kept}")
    for i, nv in enumerate((91, 30)):
        if min_kept >= nv:
            assert int(o.kept[i].sum()) == nv and thr[i] == float("inf")
        else:
            assert int(o.kept[i].sum()) == min_kept     # fp64 p of random logits: no ties


def test_ohem_ties_at_the_threshold():
    # 4 groups of identical pixels: every p in a group is bit-identical, so the k-th smallest
    # of an image falls inside a run of ties; all tied pixels must be kept (p <= threshold).
    n, c, h, w = 2, 6, 8, 8
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, c, generator=g, dtype=torch.float64) * 2
    group = torch.randint(0, 4, (n, h, w), generator=g)
    x = protos[group].permute(0, 3, 1, 2).contiguous().float()
    t = torch.zeros(n, h, w, dtype=torch.long)
    t[0, 0, :4] = 255
    for k in (1, 17, 50, 60, 64, 100):
        for thresh in (0.0, 0.7):
            o, _, _ = _check_ohem(x, t, thresh, k, f"k={k} thresh={thresh}")
            for i in range(n):   # a group is kept or dropped as a whole
                gi = group[i].reshape(-1)
                for j in range(4):
                    sel = o.kept[i][(gi == j) & o.valid[i]]
                    assert sel.all() or not sel.any(), (k, thresh, i, j)


def test_ohem_ties_equal_to_thresh():
    """Pixels whose p equals thresh exactly (two classes, equal logits: p = 1/2 in fp32 and
    fp64 alike) are kept, by the oracle and by the host path, beside random ones."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64) * 2
    x[:, :, :2] = 0.0                                  # 12 pixels per image with p = 0.5
    x = x.float()
    t = torch.randint(0, 2, (2, 6, 6), generator=g)
    for k in (1, 5, 12):
        o, _, thr = _check_ohem(x, t, 0.5, k, f"k={k}")
        assert o.kept[:, :12].all() and (thr >= 0.5).all()


def test_ohem_k_larger_than_valid_keeps_all_valid():
    shape = (2, 5, 6, 6)
    x = _logits(shape, torch.float32, seed=11)
    t = _target(shape, 5, seed=11, ignore_frac=0.5)
    nv = int((t != 255).reshape(2, -1).sum(1).max())
    for k in (nv, nv + 1, 36, 37, x.numel()):
        loss = ops.ohem_cross_entropy(x, t, min_kept=k, backend="cpp")
        o = ohem_oracle(x.double(), t, 0.7, 0)                # mining off: all valid kept
        assert abs(loss.item() - o.loss) <= 1e-5 * max(1.0, o.loss), k


def test_ohem_all_ignored():
    x = _logits((2, 3, 4, 4), torch.float32, seed=0)
    t = torch.full((2, 4, 4), 255)
    for k in (0, 3, 100):
        loss, g, _, thr = _ohem(x, t, 0.7, k)
        assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
        assert (thr == float("inf")).all()


def test_ohem_all_ignored_image_changes_nothing():
    x = _logits((3, 19, 9, 11), torch.float32, seed=21)
    t = _target(x.shape, 19, seed=21)
    t[1] = 255
    keep = torch.tensor([0, 2])
    for thresh, k in ((0.7, 40), (0.0, 0)):
        l3, g3, _, _ = _ohem(x, t, thresh, k)
        l2, g2, _, _ = _ohem(x[keep], t[keep], thresh, k)
        assert abs(l3.item() - l2.item()) <= 1e-6 * max(1.0, l2.item())
        assert torch.allclose(g3[keep], g2, rtol=1e-5, atol=1e-9) and (g3[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_ohem_extreme_logits(dtype):
    shape = (3, 19, 5, 7)
    g = torch.Generator().manual_seed(9)
    x = (torch.randint(-1, 2, shape, generator=g)).double() * 1e4
    x[1] += torch.randn(shape[1:], generator=g, dtype=torch.float64) * 30
    x = x.to(dtype)
    t = mixed_labels(g, 3, 19, 5, 7, ignore_fracs=(0.2, 0.0, 0.5))
    for thresh, k in ((0.7, 20), (0.0, 1), (1.0, 30), (0.7, 0)):
        _, grad, _ = _check_ohem(x, t, thresh, k, f"{dtype} thresh={thresh} k={k}")
        assert torch.isfinite(grad.float()).all()


def test_ohem_deterministic_across_thread_counts():
    x = _logits((4, 19, 40, 50), torch.float32, seed=4)
    t = mixed_labels(torch.Generator().manual_seed(4), 4, 19, 40, 50)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _ohem(x, t, 0.7, 500)
        torch.set_num_threads(max(2, n))
        b = _ohem(x, t, 0.7, 500)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ----------------------------------------------------------------------------- CPS loss
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 21, 7, 9), (2, 2, 5, 5), (3, 19, 16, 13)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bg", [0, None])
def test_cps_loss_matches_reference(dtype, shape, masked, bg):
    a = _logits(shape, dtype, seed=1)
    b = _logits(shape, dtype, seed=2)
    n, _, h, w = shape
    valid = (torch.rand(n, h, w, generator=torch.Generator().manual_seed(3)) > 0.3) if masked else None
    is_lab = torch.arange(n) % 2 == 0
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss, stats = ops.cps_loss(ar, br, valid, is_lab, background_index=bg, backend="cpp")
    loss.float().backward()
    ad, bd = a.double().requires_grad_(), b.double().requires_grad_()
    ref, ref_stats = cps_loss_reference(ad, bd, valid, is_lab, bg)
    ref.backward()
    assert stats.dtype == torch.int64 and torch.equal(stats, ref_stats)
    _close(loss, ref, TOL[dtype], "loss")
    _close(ar.grad, ad.grad, TOL[dtype], "grad a")
    _close(br.grad, bd.grad, TOL[dtype], "grad b")


def test_cps_loss_argmax_ties_lowest_index_and_all_invalid():
    shape = (2, 5, 4, 6)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-1, 2, shape, generator=g).float()  # many ties
    b = torch.randint(-1, 2, shape, generator=g).float()
    loss, stats = ops.cps_loss(a, b, None, None, backend="cpp")
    ref, ref_stats = cps_loss_reference(a.double(), b.double(), None, None)
    assert torch.equal(stats, ref_stats)
    _close(loss, ref, 1e-5, "loss")
    valid = torch.zeros(2, 4, 6, dtype=torch.bool)
    ar = a.clone().requires_grad_()
    loss, stats = ops.cps_loss(ar, b, valid, None, backend="cpp")
    loss.backward()
    assert loss.item() == 0.0 and stats.tolist() == [0, 0, 0, 0]
    assert torch.equal(ar.grad, torch.zeros_like(ar))


def test_cps_loss_grad_only_for_one_side():
    a = _logits((2, 4, 3, 5), torch.float32, seed=8).requires_grad_()
    b = _logits((2, 4, 3, 5), torch.float32, seed=9)
    loss, _ = ops.cps_loss(a, b, backend="cpp")
    loss.backward()
    ad = a.detach().double().requires_grad_()
    ref, _ = cps_loss_reference(ad, b.double())
    ref.backward()
    _close(a.grad, ad.grad, 1e-5, "grad a")


def test_opcheck_custom_ops(ext):
    x = _logits((2, 5, 3, 4), torch.float32, seed=0).requires_grad_()
    t = _target(x.shape, 5, seed=0)
    torch.library.opcheck(ext._ce_op, (x, t, 255, True))
    torch.library.opcheck(ext._ohem_op, (x, t, 0.7, 5, 255, True))
    torch.library.opcheck(ext._ohem_op, (x.detach(), t, 0.7, 0, 255, False))
    b = _logits((2, 5, 3, 4), torch.float32, seed=1).requires_grad_()
    torch.library.opcheck(ext._cps_op, (x, b, None, None, 0, True, True))
    torch.library.opcheck(ext._cm_op, (x.detach(), t, 5, 255))


# ----------------------------------------------------------------------------- confusion matrix
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [2, 19, 21])
def test_confusion_matrix_matches_reference(dtype, c):
    shape = (3, c, 11, 7)
    x = _logits(shape, dtype, seed=c)
    t = _target(shape, c, seed=c)
    t[0, 0, 0] = c + 3  # out of range: not counted (as the reference)
    cm = ops.confusion_matrix(x, t, c, backend="cpp")
    assert torch.equal(cm, confusion_matrix_reference(x, t, c))
    pred = x.float().argmax(1)
    for pd in (torch.int64, torch.uint8, torch.int32):
        assert torch.equal(ops.confusion_matrix(pred.to(pd), t, c, backend="cpp"),
                           confusion_matrix_reference(pred, t, c))
