"""What a dataset's labels mean (``DatasetInfo``) and the VOC colour map.

A leaf module: the dataset index (datasets.py) and the generated datasets (synthetic.py,
synthetic_v2.py, fashion.py) all import it, and it imports none of them, so that the index
can import the generators without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset's labels mean. Arrays are excluded from equality and hashing."""
    name: str
    num_classes: int
    ignore_index: int
    class_names: tuple
    palette: np.ndarray = field(compare=False)                 # (num_classes, 3) uint8
    background_index: Optional[int] = None                     # 0 for VOC/synthetic
    label_lut: Optional[np.ndarray] = field(default=None, compare=False)  # (256,) uint8


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map (bit-interleaved), ``(n, 3)`` uint8."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal
