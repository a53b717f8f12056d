"""The CPS loss: each network's argmax is the hard pseudo-label of the other's cross-entropy.

loss = CE(a, argmax b) + CE(b, argmax a), mean over valid pixels (all pixels when ``valid``
is None), no gradient through the argmax (ties go to the lowest class index, as
``torch.argmax``). ``stats`` is an int64 device tensor of four counts,
``[agree_labeled, total_labeled, agree_unlabeled, total_unlabeled]``: among valid pixels
where at least one network predicts a class other than ``background_index`` (all valid
pixels when it is None), how many predictions agree. agree/total is the overlap ratio of the
supplementary's Figure 1; it stays on the device until logged.
"""

from __future__ import annotations

from typing import Optional

import torch

STATS_FIELDS = ("agree_labeled", "total_labeled", "agree_unlabeled", "total_unlabeled")


def agreement_stats(pred_a: torch.Tensor, pred_b: torch.Tensor, valid: Optional[torch.Tensor],
                    is_labeled: Optional[torch.Tensor], background_index: Optional[int]):
    """The four agreement counts (int64, shape (4,)) from two argmax maps (N,H,W)."""
    counted = torch.ones_like(pred_a, dtype=torch.bool) if valid is None else valid.bool()
    if background_index is not None:
        counted = counted & ((pred_a != background_index) | (pred_b != background_index))
    agree = counted & (pred_a == pred_b)
    n = pred_a.shape[0]
    lab = (torch.zeros(n, dtype=torch.bool, device=pred_a.device) if is_labeled is None
           else is_labeled.to(device=pred_a.device, dtype=torch.bool))
    agree_i = agree.reshape(n, -1).sum(1)
    total_i = counted.reshape(n, -1).sum(1)
    return torch.stack([
        (agree_i * lab).sum(), (total_i * lab).sum(),
        (agree_i * ~lab).sum(), (total_i * ~lab).sum(),
    ]).to(torch.int64)


def cps_loss_reference(logits_a: torch.Tensor, logits_b: torch.Tensor,
                       valid: Optional[torch.Tensor] = None,
                       is_labeled: Optional[torch.Tensor] = None,
                       background_index: Optional[int] = 0):
    """(loss 0-dim, stats int64 (4,)). logits (N,C,H,W) each; valid (N,H,W) bool; is_labeled (N,)."""
    a = logits_a if logits_a.dtype == torch.float64 else logits_a.float()
    b = logits_b if logits_b.dtype == torch.float64 else logits_b.float()
    pred_a = a.detach().argmax(1)
    pred_b = b.detach().argmax(1)
    ce_a = torch.logsumexp(a, 1) - a.gather(1, pred_b.unsqueeze(1)).squeeze(1)
    ce_b = torch.logsumexp(b, 1) - b.gather(1, pred_a.unsqueeze(1)).squeeze(1)
    per_pixel = ce_a + ce_b
    if valid is None:
        loss = per_pixel.mean()
    else:
        v = valid.bool()
        count = v.sum().clamp_min(1).to(per_pixel.dtype)
        loss = torch.where(v, per_pixel, torch.zeros_like(per_pixel)).sum() / count
    stats = agreement_stats(pred_a, pred_b, valid, is_labeled, background_index)
    return loss.to(logits_a.dtype), stats
