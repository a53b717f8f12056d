"""Segmentation metrics from a confusion matrix (rows: target, columns: prediction)."""

from __future__ import annotations

import numpy as np
import torch


def iou_from_confusion(cm: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-class IoU; NaN for a class absent from both target and prediction."""
    cm = cm.detach().cpu().numpy() if torch.is_tensor(cm) else np.asarray(cm)
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(cm: torch.Tensor | np.ndarray) -> float:
    """mIoU over the classes present (nan-mean of the per-class IoU), as the official code."""
    iou = iou_from_confusion(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0


def pixel_accuracy(cm: torch.Tensor | np.ndarray) -> float:
    cm = cm.detach().cpu().numpy() if torch.is_tensor(cm) else np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def format_iou_table(cm, class_names) -> str:
    """A Markdown table of per-class IoU and the mIoU."""
    iou = iou_from_confusion(cm)
    lines = ["| class | IoU |", "| --- | ---: |"]
    for name, v in zip(class_names, iou):
        lines.append(f"| {name} | {'n/a' if np.isnan(v) else f'{100 * v:.2f}'} |")
    lines.append(f"| **mIoU** | **{100 * mean_iou(cm):.2f}** |")
    return "\n".join(lines)


def overlap_ratios(stats: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Overlap of the two networks from the CPS agreement counts
    [agree_labeled, total_labeled, agree_unlabeled, total_unlabeled]."""
    s = stats.detach().cpu().numpy() if torch.is_tensor(stats) else np.asarray(stats)
    s = s.astype(np.float64)

    def ratio(a, t):
        return float(a / t) if t > 0 else float("nan")
    return {"overlap_labeled": ratio(s[0], s[1]), "overlap_unlabeled": ratio(s[2], s[3]),
            "overlap_all": ratio(s[0] + s[2], s[1] + s[3])}
