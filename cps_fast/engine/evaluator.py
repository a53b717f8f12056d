"""Evaluation: whole-image or sliding-window inference, optional flip and multi-scale,
confusion matrices accumulated on the device (copied once, at the end)."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import EvalConfig


def _forward(net: nn.Module, x: torch.Tensor, amp_dtype) -> torch.Tensor:
    ctx = (torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        return net(x).float()


def sliding_logits(net: nn.Module, image: torch.Tensor, crop: int, stride_rate: float,
                   num_classes: int, amp_dtype=None) -> torch.Tensor:
    """Summed logits (N, C, H, W) of crop×crop windows at stride ceil(crop·stride_rate).

    Images smaller than a window are padded (0, i.e. the normalised mean, bottom/right) to
    one window, as the official evaluation does at ≤500 px with a 512 window."""
    n, _, h, w = image.shape
    ph, pw = max(h, crop), max(w, crop)
    if (ph, pw) != (h, w):
        image = F.pad(image, (0, pw - w, 0, ph - h), value=0.0)
    stride = max(1, int(math.ceil(crop * stride_rate)))
    ny = int(math.ceil(max(ph - crop, 0) / stride)) + 1
    nx = int(math.ceil(max(pw - crop, 0) / stride)) + 1
    total = image.new_zeros((n, num_classes, ph, pw), dtype=torch.float32)
    for iy in range(ny):
        for ix in range(nx):
            y0 = min(iy * stride, ph - crop)
            x0 = min(ix * stride, pw - crop)
            window = image[:, :, y0:y0 + crop, x0:x0 + crop]
            total[:, :, y0:y0 + crop, x0:x0 + crop] += _forward(net, window, amp_dtype)
    return total[:, :, :h, :w]


def predict_logits(net: nn.Module, image: torch.Tensor, cfg: EvalConfig, num_classes: int,
                   amp_dtype=None) -> torch.Tensor:
    """Logits (N, C, H, W) at the image's size, summed over scales and flips."""
    n, _, h, w = image.shape
    out = image.new_zeros((n, num_classes, h, w), dtype=torch.float32)
    for scale in cfg.scales:
        x = image
        if scale != 1.0:
            size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
            x = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
        for flip in ((False, True) if cfg.flip else (False,)):
            xi = x.flip(-1) if flip else x
            if cfg.mode == "sliding":
                logits = sliding_logits(net, xi, cfg.crop_size, cfg.stride_rate, num_classes,
                                        amp_dtype)
            else:
                logits = _forward(net, xi, amp_dtype)
            if flip:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
            out += logits
    return out


@torch.no_grad()
def evaluate(nets: dict[str, nn.Module], batches: Iterable, cfg: EvalConfig, num_classes: int,
             ignore_index: int, device: torch.device, amp_dtype=None, backend: str = "auto",
             ensemble: bool = False, progress: Optional[Callable[[int], None]] = None
             ) -> dict[str, torch.Tensor]:
    """Confusion matrices (C, C) int64 on the device, one per network (and "ensemble": the
    sum of both networks' softmax probabilities, when asked and there are two)."""
    was_training = {k: m.training for k, m in nets.items()}
    for m in nets.values():
        m.eval()
    # The loss backend chosen for training may have no confusion-matrix kernel (Triton).
    backend = backend if ops.implements("confusion_matrix", backend) else "auto"
    names = list(nets) + (["ensemble"] if ensemble and len(nets) == 2 else [])
    cms = {k: torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
           for k in names}
    try:
        for i, (image, label, _sid) in enumerate(batches):
            image = image.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True)
            probs = []
            for k, net in nets.items():
                logits = predict_logits(net, image, cfg, num_classes, amp_dtype)
                cms[k] += ops.confusion_matrix(logits, label, num_classes, ignore_index,
                                               backend=backend)
                if "ensemble" in cms:
                    probs.append(logits.softmax(1))
            if "ensemble" in cms:
                cms["ensemble"] += ops.confusion_matrix(sum(probs), label, num_classes,
                                                        ignore_index, backend=backend)
            if progress is not None:
                progress(i + 1)
    finally:
        for k, m in nets.items():
            m.train(was_training[k])
    return cms
