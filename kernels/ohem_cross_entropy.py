"""OHEM cross-entropy with the official CPS ``ProbOhemCrossEntropy2d`` semantics.

p = softmax probability of the target class at each valid pixel. If num_valid > min_kept,
t = the min_kept-th smallest p, threshold = max(t, thresh), and the loss is the mean CE over
valid pixels with p <= threshold; otherwise every valid pixel is kept. The reference finds
t with ``torch.kthvalue`` over a tensor whose invalid entries are pushed above every
probability, so that no host synchronisation and no data-dependent shape is needed.
"""

from __future__ import annotations

import torch


def ohem_per_pixel(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """Per-pixel (ce, p_target, valid), flattened, computed in at least fp32."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    valid = target != ignore_index
    safe_t = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
    logp = torch.log_softmax(x, dim=1).gather(1, safe_t.unsqueeze(1)).squeeze(1)
    return (-logp).reshape(-1), logp.detach().exp().reshape(-1), valid.reshape(-1)


def ohem_threshold(p: torch.Tensor, valid: torch.Tensor, thresh: float, min_kept: int):
    """The probability threshold (0-dim tensor) of the OHEM rule; +inf keeps every valid pixel."""
    num_valid = valid.sum()
    inf = torch.full((), float("inf"), dtype=p.dtype, device=p.device)
    if min_kept <= 0 or min_kept > p.numel():
        # Fewer pixels than min_kept in the whole batch: every valid pixel is always kept.
        return inf if min_kept > 0 else torch.full_like(inf, thresh)
    # Invalid pixels are pushed to 2 (above any probability) so the k-th smallest is a valid
    # pixel's p whenever num_valid >= min_kept.
    kth = torch.kthvalue(torch.where(valid, p, torch.full_like(p, 2.0)), min_kept).values
    t = torch.clamp_min(kth, thresh)
    return torch.where(num_valid > min_kept, t, inf)


def ohem_cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor,
                                 thresh: float = 0.7, min_kept: int = 50000,
                                 ignore_index: int = 255) -> torch.Tensor:
    """OHEM CE (mean over kept pixels, 0 when none). logits (N,C,H,W), target (N,H,W)."""
    ce, p, valid = ohem_per_pixel(logits, target, ignore_index)
    threshold = ohem_threshold(p, valid, thresh, min_kept)
    kept = valid & (p <= threshold)
    count = kept.sum().clamp_min(1).to(ce.dtype)
    return (torch.where(kept, ce, torch.zeros_like(ce)).sum() / count).to(logits.dtype)
