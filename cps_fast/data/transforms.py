"""Training augmentation and validation preprocessing (DESIGN.md section 2).

Training, per sample, with every random value drawn ONCE and applied to image and label:

1. ``scale`` drawn uniformly from ``cfg.scales``; the image is resized bilinearly and the
   label by nearest neighbour to ``floor(h * scale + 0.5) x floor(w * scale + 0.5)``;
2. the image is normalised (``(x / 255 - mean) / std``, ImageNet statistics);
3. both are padded on the bottom / right up to the crop size when smaller (image with 0
   AFTER normalisation, i.e. the mean colour; label with ``ignore_index``);
4. a ``crop x crop`` window at offsets ``(crop_y, crop_x)`` drawn uniformly over the padded
   canvas, the same for both;
5. a horizontal flip of the crop with p = 0.5 (when ``cfg.flip``), the same for both.

The draw order from the ``np.random.Generator`` is fixed (scale index, crop_y, crop_x,
flip — the flip coin is drawn even when flipping is off, so the other draws do not move),
so the DALI pipeline and the tests can reproduce a sample exactly from ``AugParams``.

Work is only spent on the pixels that survive the crop: normalisation runs on the cropped
region and writes straight into the zero-filled (= padded) CHW output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig


@dataclass(frozen=True)
class AugParams:
    """The random values drawn for one training sample."""
    scale: float
    size: tuple            # (h, w) after scaling, before padding
    crop_y: int            # top-left of the crop window in the padded canvas
    crop_x: int
    flip: bool             # the crop was mirrored left-right


def scaled_size(h: int, w: int, scale: float) -> tuple:
    """Size after scaling, rounded half up (as cv2.resize with fx=fy=scale), at least 1."""
    return max(1, int(math.floor(h * scale + 0.5))), max(1, int(math.floor(w * scale + 0.5)))


def draw_params(rng: np.random.Generator, h: int, w: int, scales: Sequence[float],
                crop_size: int, flip: bool = True) -> AugParams:
    """Draw one sample's augmentation for an ``h x w`` input (see the module docstring)."""
    scale = float(scales[int(rng.integers(len(scales)))])
    sh, sw = scaled_size(h, w, scale)
    ph, pw = max(sh, crop_size), max(sw, crop_size)
    crop_y = int(rng.integers(0, ph - crop_size + 1))
    crop_x = int(rng.integers(0, pw - crop_size + 1))
    coin = bool(rng.random() < 0.5)  # always drawn, so turning flips off changes nothing else
    return AugParams(scale, (sh, sw), crop_y, crop_x, coin and flip)


def _norm_coeffs(mean: Sequence[float], std: Sequence[float]) -> tuple:
    """(x / 255 - m) / s == x * a + b with a = 1 / (255 s), b = -m / s, per channel."""
    std = np.asarray(std, dtype=np.float64)
    a = (1.0 / (255.0 * std)).astype(np.float32)
    b = (-np.asarray(mean, dtype=np.float64) / std).astype(np.float32)
    return a, b


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``H x W x 3`` uint8 RGB -> ``3 x H x W`` float32 normalised."""
    a, b = _norm_coeffs(mean, std)
    out = image.astype(np.float32) * a + b
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def resize_pair(image: np.ndarray, label: Optional[np.ndarray], size: tuple) -> tuple:
    """Resize image bilinearly and label by nearest neighbour to ``size`` = (h, w)."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return image, label
    wh = (size[1], size[0])
    image = np.asarray(Image.fromarray(image).resize(wh, Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize(wh, Image.NEAREST))
    return image, label


def apply_params(image: np.ndarray, label: Optional[np.ndarray], p: AugParams, crop_size: int,
                 mean: Sequence[float], std: Sequence[float], ignore_index: int = 255) -> tuple:
    """Apply drawn parameters: -> (image ``3 x c x c`` float32, label ``c x c`` uint8 or None)."""
    image, label = resize_pair(image, label, p.size)
    sh, sw = p.size
    c = crop_size
    # The part of the crop window that lies on the image; the rest is padding.
    rh, rw = min(sh - p.crop_y, c), min(sw - p.crop_x, c)
    a, b = _norm_coeffs(mean, std)
    out = np.zeros((3, c, c), dtype=np.float32)  # 0 = padding after normalisation
    region = image[p.crop_y:p.crop_y + rh, p.crop_x:p.crop_x + rw].astype(np.float32)
    out[:, :rh, :rw] = (region * a + b).transpose(2, 0, 1)
    lab = None
    if label is not None:
        lab = np.full((c, c), ignore_index, dtype=np.uint8)
        lab[:rh, :rw] = label[p.crop_y:p.crop_y + rh, p.crop_x:p.crop_x + rw]
    if p.flip:
        out = out[:, :, ::-1]
        lab = lab[:, ::-1] if lab is not None else None
    out = np.ascontiguousarray(out)
    return out, (np.ascontiguousarray(lab) if lab is not None else None)


def train_transform_with_params(image: np.ndarray, label: Optional[np.ndarray],
                                rng: np.random.Generator, cfg: DataConfig) -> tuple:
    """Augment one sample; -> (image float32 tensor (3,c,c), label int64 tensor (c,c) or None,
    AugParams)."""
    p = draw_params(rng, image.shape[0], image.shape[1], cfg.scales, cfg.crop_size, cfg.flip)
    img, lab = apply_params(image, label, p, cfg.crop_size, cfg.mean, cfg.std, cfg.ignore_index)
    img_t = torch.from_numpy(img)
    lab_t = torch.from_numpy(lab.astype(np.int64)) if lab is not None else None
    return img_t, lab_t, p


def train_transform(image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator,
                    cfg: DataConfig) -> tuple:
    """Augment one sample; -> (image float32 (3,c,c), label int64 (c,c) or None)."""
    img, lab, _ = train_transform_with_params(image, label, rng, cfg)
    return img, lab


def val_transform(image: np.ndarray, label: Optional[np.ndarray], cfg: DataConfig) -> tuple:
    """No augmentation: (normalised image float32 (3,H,W), label int64 (H,W) or None)."""
    img = torch.from_numpy(normalize(image, cfg.mean, cfg.std))
    lab = torch.from_numpy(label.astype(np.int64)) if label is not None else None
    return img, lab


def denormalize(image: torch.Tensor | np.ndarray, mean: Sequence[float],
                std: Sequence[float]) -> np.ndarray:
    """``3 x H x W`` normalised -> ``H x W x 3`` uint8 (for previews)."""
    x = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    x = x.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def colorize(label: np.ndarray, palette: np.ndarray, ignore_color=(255, 255, 255)) -> np.ndarray:
    """``H x W`` class indices -> ``H x W x 3`` uint8 colours (ignore and unknown: white)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = ignore_color
    lut[: len(palette)] = palette
    return lut[np.asarray(label).astype(np.uint8)]
