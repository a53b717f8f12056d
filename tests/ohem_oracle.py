"""The fp64 per-image OHEM oracle every backend's test compares with (imported by name:
tests/ is on sys.path through tests/conftest.py).

Written differently from ``ohem_cross_entropy_reference`` on purpose: a Python loop over the
images, each image's valid probabilities gathered (a data-dependent shape) and sorted on
their own, the CE and its gradient written out by hand (softmax - onehot). It runs in fp64 on
the device of its inputs (torch, so that the gpu tests can afford real shapes). The rule
(kernels/ohem_cross_entropy.py): per image, t_n = the min_kept-th smallest p of its valid
pixels, threshold_n = max(t_n, thresh) if min_kept > 0 and num_valid_n > min_kept, else
+inf; kept = valid & p <= threshold_n; loss = mean over the images with a kept pixel of
their mean CE over the kept pixels (0 if none).

A backend computes p in fp32, the oracle in fp64: a pixel whose p lies within rounding of
its image's threshold can be kept by one and dropped by the other. So a backend is checked
in three steps (:func:`check_backend`):
  1. its selection is exact: its thresholds are bitwise what the rule gives on its *own*
     fp32 p (read back from its keys), and its kept set follows from them;
  2. its kept set differs from the fp64 oracle's only at pixels next to the threshold, and
     only at a few of them;
  3. loss and gradient equal the fp64 oracle's evaluated on the backend's kept set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Oracle:
    loss: float
    grad: torch.Tensor        # (N, C, H, W) d loss / d logits, fp64
    kept: torch.Tensor        # (N, H*W) bool
    valid: torch.Tensor       # (N, H*W) bool
    p: torch.Tensor           # (N, H*W) fp64 target-class probability (0 where not valid)
    threshold: torch.Tensor   # (N,) fp64, the threshold the selection used (+inf: all kept)


def select_image(p: torch.Tensor, valid: torch.Tensor, thresh: float, min_kept: int):
    """(threshold, kept) of one image (1-D p, valid): a sort of its valid probabilities."""
    vals = torch.sort(p[valid]).values
    thr = math.inf
    if min_kept > 0 and vals.numel() > min_kept:
        thr = max(float(vals[min_kept - 1]), thresh)
    return thr, valid & (p <= thr)


def ohem_oracle(logits, target, thresh: float, min_kept: int, ignore_index: int = 255,
                p_select: Optional[torch.Tensor] = None,
                kept: Optional[torch.Tensor] = None) -> Oracle:
    """fp64 OHEM per image. ``p_select`` (N, H*W): select with these probabilities (a
    backend's own fp32 p; ``thresh`` is then rounded to fp32 as the backends do) instead of
    the fp64 ones. ``kept`` (N, H*W): skip the selection and use this kept set as is."""
    x = torch.as_tensor(logits).detach().double()
    dev = x.device
    t = torch.as_tensor(target).to(dev).long()
    n, c, h, w = x.shape
    hw = h * w
    grad = torch.zeros((n, hw, c), dtype=torch.float64, device=dev)
    out_kept = torch.zeros((n, hw), dtype=torch.bool, device=dev)
    out_valid = torch.zeros_like(out_kept)
    out_p = torch.zeros((n, hw), dtype=torch.float64, device=dev)
    out_thr = torch.full((n,), math.inf, dtype=torch.float64)
    image_means = []
    rows = torch.arange(hw, device=dev)
    thresh32 = float(torch.tensor(thresh, dtype=torch.float32))
    for i in range(n):
        xi = x[i].reshape(c, hw).t()                        # (hw, c)
        ti = t[i].reshape(hw)
        valid = (ti != ignore_index) & (ti >= 0) & (ti < c)
        tc = torch.where(valid, ti, torch.zeros_like(ti))
        z = xi - xi.max(dim=1, keepdim=True).values
        e = torch.exp(z)
        s = e.sum(dim=1)
        logp = z[rows, tc] - torch.log(s)
        p = torch.where(valid, torch.exp(logp), torch.zeros_like(logp))
        if kept is not None:
            k_i = torch.as_tensor(kept[i]).to(dev).bool() & valid
        elif p_select is None:
            out_thr[i], k_i = select_image(p, valid, float(thresh), min_kept)
        else:
            out_thr[i], k_i = select_image(torch.as_tensor(p_select[i]).to(dev).double(),
                                           valid, thresh32, min_kept)
        cnt = int(k_i.sum())
        if cnt:
            image_means.append(float(-logp[k_i].sum()) / cnt)
            g = e / s[:, None]
            g[rows, tc] -= 1.0
            grad[i] = torch.where(k_i[:, None], g / cnt, torch.zeros((), dtype=g.dtype,
                                                                      device=dev))
        out_kept[i], out_valid[i], out_p[i] = k_i, valid, p
    m = len(image_means)
    loss = sum(image_means) / m if m else 0.0
    grad = (grad / max(m, 1)).reshape(n, h, w, c).permute(0, 3, 1, 2)
    return Oracle(loss, grad, out_kept, out_valid, out_p, out_thr)


def kept_from_keys(key: torch.Tensor, threshold: torch.Tensor):
    """(kept, valid, p) of a backend from its keys (bits of fp32 p, -1 where not valid) and
    its per-image thresholds, each (N, H*W)."""
    n = key.shape[0]
    k = key.detach().reshape(n, -1)
    valid = k >= 0
    p = torch.where(valid, k.view(torch.float32), torch.zeros((), device=k.device))
    kept = valid & (p <= threshold.detach().to(k.device).float().reshape(n, 1))
    return kept, valid, p.double()


def check_selection_exact(key, threshold, target, thresh, min_kept, what,
                          ignore_index: int = 255) -> torch.Tensor:
    """Step 1: the backend's thresholds are exactly the rule applied to its own fp32 p (and
    fp32 thresh); returns its kept set (N, H*W)."""
    kept, valid, p = kept_from_keys(key, threshold)
    t = torch.as_tensor(target).to(kept.device).reshape(kept.shape[0], -1)
    assert torch.equal(valid, t != ignore_index), f"{what}: valid pixels differ"
    thresh32 = float(torch.tensor(thresh, dtype=torch.float32))
    for i in range(kept.shape[0]):
        thr, k_i = select_image(p[i], valid[i], thresh32, min_kept)
        got = float(threshold[i])
        assert got == thr, f"{what}: image {i} threshold {got!r}, the rule on its own p {thr!r}"
        assert torch.equal(kept[i], k_i), f"{what}: image {i} kept set is not the rule's"
    return kept


# Below this a probability is in fp32's underflow range, where the backends legitimately
# disagree with fp64 and with each other (the host path's exp is clamped at exp(-87) ~ 1.6e-38,
# the GPU's exp flushes denormals to 0, fp64 still has values down to 1e-308): at logits
# of +-1e4 every such pixel "ties" at p = 0 in fp64 and not in fp32.
P_UNDERFLOW = 1e-36


def check_kept_near_oracle(kept: torch.Tensor, o: Oracle, what: str, near: float = 1e-5,
                           max_frac: float = 1e-3) -> int:
    """Step 2: where the backend's kept set and the fp64 oracle's differ, the pixel's fp64 p
    is within ``near`` (relative; P_UNDERFLOW absolute) of its image's threshold, and such
    pixels are few: at most ``max_frac`` of the valid pixels (at least 2 per image), not
    counting those in fp32's underflow range. Returns the number that differ."""
    kept = kept.to(o.kept.device)
    diff = kept != o.kept
    if not bool(diff.any()):
        return 0
    n_idx, p_idx = torch.nonzero(diff, as_tuple=True)
    thr = o.threshold.to(o.p.device)[n_idx]
    p = o.p[n_idx, p_idx]
    assert bool(torch.isfinite(thr).all()), (
        f"{what}: an image that keeps every valid pixel differs (images {n_idx.tolist()[:8]})")
    far = (p - thr).abs() > near * thr + P_UNDERFLOW
    assert not bool(far.any()), (
        f"{what}: pixels kept by only one side lie far from the threshold: p "
        f"{p[far][:4].tolist()} vs threshold {thr[far][:4].tolist()}")
    counted = int((torch.maximum(p, thr) >= P_UNDERFLOW).sum())
    bound = max(2 * kept.shape[0], int(max_frac * int(o.valid.sum())))
    assert counted <= bound, f"{what}: {counted} pixels differ (> {bound})"
    return int(diff.sum())


def check_close(loss, grad, o: Oracle, dtype: torch.dtype, what: str,
                grad_out: float = 1.0) -> None:
    """Step 3 tolerances. Every backend computes in fp32 from logits exactly representable
    in ``dtype`` and rounds once to ``dtype``: fp32 far below 1e-3, 16-bit within one
    rounding step of the dtype (relative to the largest value). ``grad`` is the gradient
    of ``grad_out * loss`` (None: loss only)."""
    got = float(loss.detach().double())
    assert math.isfinite(got), f"{what}: loss {got}"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(got - o.loss) <= tol * max(1.0, abs(o.loss)), f"{what}: loss {got} vs {o.loss}"
    if grad is None:
        return
    g = grad.detach().to(o.grad.device)
    assert bool(torch.isfinite(g).all()), f"{what}: non-finite gradient"
    if g.numel() == 0:
        return
    scale = float(o.grad.abs().max()) * abs(grad_out)
    err = float((g.double() - o.grad * grad_out).abs().max())
    if dtype == torch.float32:
        bound = 1e-5 * scale
    else:
        bound = torch.finfo(dtype).eps * scale
    assert err <= bound, f"{what}: gradient error {err:.3g} > {bound:.3g} (scale {scale:.3g})"


def check_backend(logits, target, thresh, min_kept, loss, grad, key, threshold, dtype,
                  what, ignore_index: int = 255, grad_out: float = 1.0) -> Oracle:
    """The three steps of the module docstring; returns the fp64 oracle (its own kept set).
    Runs on the device of ``logits``."""
    kept = check_selection_exact(key, threshold, target, thresh, min_kept, what, ignore_index)
    o64 = ohem_oracle(logits, target, thresh, min_kept, ignore_index)
    same = o64
    if check_kept_near_oracle(kept, o64, what):
        same = ohem_oracle(logits, target, thresh, min_kept, ignore_index, kept=kept)
    check_close(loss, grad, same, dtype, what, grad_out)
    return o64


# ----------------------------------------------------------------------------- inputs
def mixed_labels(gen: torch.Generator, n: int, c: int, h: int, w: int,
                 ignore_fracs=(0.2, 0.9, 1.0), ignore_index: int = 255,
                 dtype=torch.int64) -> torch.Tensor:
    """Labels whose images differ in how many pixels are valid: image i ignores about
    ``ignore_fracs[i % len]`` of its pixels (1.0: an all-ignored image), so one min_kept
    falls between the images' valid counts (some select, some keep everything)."""
    t = torch.randint(0, c, (n, h, w), generator=gen)
    for i in range(n):
        f = ignore_fracs[i % len(ignore_fracs)]
        t[i][torch.rand(h, w, generator=gen) < f] = ignore_index
    return t.to(dtype)
