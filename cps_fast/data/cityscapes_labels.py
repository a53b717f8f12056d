"""Cityscapes label tables: the 19 evaluation classes (trainIds), their colours, and the
labelId -> trainId lookup table (the official ``cityscapesscripts`` mapping)."""

from __future__ import annotations

import numpy as np

# (trainId, name, labelId, colour) of the 19 classes Cityscapes evaluates.
_CLASSES = (
    (0, "road", 7, (128, 64, 128)),
    (1, "sidewalk", 8, (244, 35, 232)),
    (2, "building", 11, (70, 70, 70)),
    (3, "wall", 12, (102, 102, 156)),
    (4, "fence", 13, (190, 153, 153)),
    (5, "pole", 17, (153, 153, 153)),
    (6, "traffic light", 19, (250, 170, 30)),
    (7, "traffic sign", 20, (220, 220, 0)),
    (8, "vegetation", 21, (107, 142, 35)),
    (9, "terrain", 22, (152, 251, 152)),
    (10, "sky", 23, (70, 130, 180)),
    (11, "person", 24, (220, 20, 60)),
    (12, "rider", 25, (255, 0, 0)),
    (13, "car", 26, (0, 0, 142)),
    (14, "truck", 27, (0, 0, 70)),
    (15, "bus", 28, (0, 60, 100)),
    (16, "train", 31, (0, 80, 100)),
    (17, "motorcycle", 32, (0, 0, 230)),
    (18, "bicycle", 33, (119, 11, 32)),
)

CITYSCAPES_CLASS_NAMES: tuple[str, ...] = tuple(c[1] for c in _CLASSES)
CITYSCAPES_PALETTE: np.ndarray = np.array([c[3] for c in _CLASSES], dtype=np.uint8)
CITYSCAPES_NUM_CLASSES = 19


def labelid_to_trainid_lut(ignore_index: int = 255) -> np.ndarray:
    """(256,) uint8 table: labelId -> trainId; every unmapped labelId -> ``ignore_index``."""
    lut = np.full(256, ignore_index, dtype=np.uint8)
    for train_id, _, label_id, _ in _CLASSES:
        lut[label_id] = train_id
    return lut
