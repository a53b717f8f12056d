"""Confusion matrix (rows: target class, columns: predicted class) for evaluation.

Accumulated with ``scatter_add_`` into a fixed-size buffer (ignored pixels go to a spill
slot that is dropped), so it has no data-dependent shape and never syncs the host.
"""

from __future__ import annotations

import torch


def confusion_matrix_reference(logits_or_pred: torch.Tensor, target: torch.Tensor,
                               num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(C, C) int64. Accepts logits (N,C,H,W) (argmax taken) or predictions (N,H,W)."""
    if logits_or_pred.dim() == 4:
        pred = logits_or_pred.argmax(1)
    else:
        pred = logits_or_pred
    t = target.long().reshape(-1)
    p = pred.long().reshape(-1)
    counted = (t != ignore_index) & (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    spill = num_classes * num_classes
    idx = torch.where(counted, t * num_classes + p, torch.full_like(t, spill))
    cm = torch.zeros(spill + 1, dtype=torch.int64, device=t.device)
    cm.scatter_add_(0, idx, torch.ones_like(idx))
    return cm[:spill].reshape(num_classes, num_classes)
