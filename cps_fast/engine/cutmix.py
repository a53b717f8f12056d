"""CutMix box masks for CPS + CutMix, drawn on the device.

Follows the official ``BoxMaskGenerator`` (prop_range (0.25, 0.5), 3 boxes, random aspect
ratio, boxes within bounds, inverted): each box's area proportion p ~ U(low, high); its
height proportion is exp(u * log p) with u ~ U(0, 1) and its width proportion p / height;
both are scaled by sqrt(1 / n_boxes); the mask starts at 0 and every box toggles the pixels
it covers (so overlaps cancel, as the official loop's ``1 - mask`` does). Everything is
tensor arithmetic on the device from a ``torch.Generator``: no host round trip, fixed
shapes, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def box_masks(n: int, height: int, width: int, generator: Optional[torch.Generator],
              device: torch.device, prop_range=(0.25, 0.5), n_boxes: int = 3) -> torch.Tensor:
    """(n, 1, H, W) float32 masks of 0/1; 1 = take the second image."""
    low, high = prop_range
    u = torch.rand((n, n_boxes, 4), generator=generator, device=device)
    prop = low + (high - low) * u[..., 0]
    y_prop = torch.exp(u[..., 1] * torch.log(prop))
    x_prop = prop / y_prop
    fac = math.sqrt(1.0 / n_boxes)
    size_y = torch.round(y_prop * fac * height)
    size_x = torch.round(x_prop * fac * width)
    y0 = torch.round((height - size_y) * u[..., 2])
    x0 = torch.round((width - size_x) * u[..., 3])
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width)
    inside_y = (ys >= y0[..., None, None]) & (ys < (y0 + size_y)[..., None, None])
    inside_x = (xs >= x0[..., None, None]) & (xs < (x0 + size_x)[..., None, None])
    inside = (inside_y & inside_x).to(torch.int32)           # (n, boxes, H, W)
    # Toggle per box: the parity of the number of covering boxes.
    return (inside.sum(1, keepdim=True) % 2).to(torch.float32)


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a where mask == 0, b where mask == 1 (mask broadcast over channels)."""
    return a * (1 - mask) + b * mask
