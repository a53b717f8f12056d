"""Cross-entropy with ignore_index, mean over the non-ignored pixels counted on the device.

``cross_entropy_reference`` is the eager reference every other backend is tested against.
An all-ignored batch gives loss 0 and zero gradient (not NaN): the count is clamped to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor,
                            ignore_index: int = 255) -> torch.Tensor:
    """Mean CE over pixels whose target != ignore_index. logits (N,C,H,W), target (N,H,W)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    total = F.cross_entropy(x, target.long(), ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum()
    # clamp keeps the all-ignored case at 0 / 1 = 0 without a host-side branch.
    return (total / count.clamp_min(1).to(total.dtype)).to(logits.dtype)
