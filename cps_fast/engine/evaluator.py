"""Evaluation: whole-image or sliding-window inference, optional flip and multi-scale, the
network inputs of several images batched together, confusion matrices accumulated on the
device (copied once, at the end).

What a figure means (the protocol, see :func:`protocol`):
- a prediction is the *mean* logits over every network input that covers the pixel: the
  crop×crop windows of a sliding evaluation (stride ``ceil(crop·stride_rate)``, the last
  window flush with the border, images smaller than a window padded with 0 = the
  normalised mean, bottom/right), each also flipped horizontally when ``flip`` is on (the
  flip is applied to each window, as the official CPS evaluator does), then the mean over
  ``scales`` after resizing each scale's logits back to the image (bilinear,
  align_corners=True). For one network at one scale the argmax is the official one
  (which sums the windows' logits: dividing by the positive per-pixel count does not move
  an argmax); the mean keeps scales and the ensemble's softmax on one footing.
- the ensemble is the mean of the two networks' softmax probabilities.

Nothing here synchronises the host with the device: window positions depend on image
shapes only, and the confusion matrices stay on the device until the caller copies them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ConfigError, EvalConfig

FIGURES = ("a", "b", "ensemble")
ENSEMBLE_RULE = "mean of the softmax probabilities of networks a and b"


# ----------------------------------------------------------------------------- protocol
def eval_figures(network: str, num_nets: int) -> list[str]:
    """The figures ``eval.network`` asks for, among those a run with ``num_nets`` networks
    has: all = a, b and their ensemble; both = a and b; a, b, ensemble = that one."""
    want = {"all": ["a", "b", "ensemble"], "both": ["a", "b"], "a": ["a"], "b": ["b"],
            "ensemble": ["ensemble"]}[network]
    have = ["a"] if num_nets == 1 else list(FIGURES)
    got = [f for f in want if f in have]
    if not got:
        raise ConfigError(f"eval.network={network}: this run has one network (a) only")
    return got


def check_select(select: str, figures: Sequence[str], network: str) -> None:
    """``eval.select`` must name a figure that is evaluated (``max``: any)."""
    if select != "max" and select not in figures:
        raise ConfigError(f"eval.select={select}: that figure is not evaluated "
                          f"(eval.network={network} gives {', '.join(figures)}); set "
                          f"eval.select to one of {', '.join(list(figures) + ['max'])}")


def headline(mious: dict[str, float], select: str) -> str:
    """The figure reported as ``miou`` (and that picks best.pt): ``select``, or for
    ``max`` the best of those evaluated (optimistic: not the paper's protocol)."""
    if select == "max":
        return max(mious, key=lambda k: mious[k])
    return select


def stride_px(crop: int, stride_rate: float) -> int:
    return max(1, int(math.ceil(crop * stride_rate)))


def protocol(cfg: EvalConfig, figures: Sequence[str], images: Optional[int] = None) -> dict:
    """The evaluation protocol as a structured dict (stored with every eval record)."""
    d = {"mode": cfg.mode, "flip": bool(cfg.flip), "scales": [float(s) for s in cfg.scales]}
    if cfg.mode == "sliding":
        d.update(crop=int(cfg.crop_size), stride=stride_px(cfg.crop_size, cfg.stride_rate),
                 stride_rate=round(float(cfg.stride_rate), 6))
    d.update(figures=list(figures), select=cfg.select)
    if "ensemble" in figures:
        d["ensemble"] = ENSEMBLE_RULE
    if images is not None:
        d["images"] = int(images)
    return d


def protocol_str(p: dict) -> str:
    """One short line, e.g. ``sliding 512/342, no flip, scale 1, 1449 images``."""
    if p["mode"] == "sliding":
        head = f"sliding {p['crop']}/{p['stride']}"
    else:
        head = "whole image"
    scales = ",".join(f"{s:g}" for s in p["scales"])
    parts = [head, "flip" if p["flip"] else "no flip",
             f"scale{'s' if len(p['scales']) > 1 else ''} {scales}"]
    if "images" in p:
        parts.append(f"{p['images']} images")
    return ", ".join(parts)


def figure_label(name: str) -> str:
    return "ensemble (a+b)" if name == "ensemble" else f"network {name}"


def format_mious(rec: dict, figures) -> str:
    """``mIoU 72.31 (network a, headline) | network b 71.80 | ensemble (a+b) 73.02 [sliding
    512/342, no flip, scale 1, 1449 images]``: each figure names its network."""
    head = rec["headline"]
    parts = [f"mIoU {100 * rec['miou']:.2f} ({figure_label(head)}, headline)"]
    parts += [f"{figure_label(k)} {100 * rec[f'miou_{k}']:.2f}" for k in figures if k != head]
    return " | ".join(parts) + f" [{rec['protocol_str']}]"


# ----------------------------------------------------------------------------- inference
def _forward(net: nn.Module, x: torch.Tensor, amp_dtype) -> torch.Tensor:
    ctx = (torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        return net(x).float()


def window_origins(h: int, w: int, crop: int, stride_rate: float):
    """(padded h, padded w, [(y0, x0), ...]) of the crop×crop windows over an h×w image."""
    ph, pw = max(h, crop), max(w, crop)
    stride = stride_px(crop, stride_rate)
    ny = int(math.ceil(max(ph - crop, 0) / stride)) + 1
    nx = int(math.ceil(max(pw - crop, 0) / stride)) + 1
    return ph, pw, [(min(iy * stride, ph - crop), min(ix * stride, pw - crop))
                    for iy in range(ny) for ix in range(nx)]


def _scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    if scale == 1.0:
        return h, w
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def inputs_per_image(h: int, w: int, cfg: EvalConfig) -> int:
    """Network inputs one h×w image costs under ``cfg`` (what ``eval.max_batch`` bounds)."""
    flips = 2 if cfg.flip else 1
    if cfg.mode != "sliding":
        return flips * len(cfg.scales)
    total = 0
    for s in cfg.scales:
        sh, sw = _scaled_size(h, w, s)
        total += len(window_origins(sh, sw, cfg.crop_size, cfg.stride_rate)[2])
    return total * flips


@dataclass
class _Job:
    """One network input: a region of a scaled (and padded) image, maybe flipped."""
    image: int
    scale: int
    y0: int
    x0: int
    flip: bool


def predict_logits_many(net: nn.Module, images: Sequence[torch.Tensor], cfg: EvalConfig,
                        num_classes: int, amp_dtype=None,
                        max_batch: Optional[int] = None) -> list[torch.Tensor]:
    """Mean logits (n, C, H, W) fp32 for each image (n, 3, H, W) of ``images`` (sizes may
    differ), the network inputs of all of them run as batches of at most ``max_batch``
    (default ``cfg.max_batch``) images: all windows, flips and scales of every image whose
    inputs have one shape (every sliding window; whole images of one size)."""
    max_batch = max(1, int(max_batch or cfg.max_batch))
    sliding = cfg.mode == "sliding"
    crop = cfg.crop_size
    flips = (False, True) if cfg.flip else (False,)
    scaled, canvas, count, jobs = {}, {}, {}, []
    for i, img in enumerate(images):
        n, _, h, w = img.shape
        for si, s in enumerate(cfg.scales):
            sh, sw = _scaled_size(h, w, s)
            x = img if (sh, sw) == (h, w) else F.interpolate(
                img, size=(sh, sw), mode="bilinear", align_corners=True)
            if sliding:
                ph, pw, origins = window_origins(sh, sw, crop, cfg.stride_rate)
                if (ph, pw) != (sh, sw):
                    x = F.pad(x, (0, pw - sw, 0, ph - sh), value=0.0)
            else:
                ph, pw, origins = sh, sw, [(0, 0)]
            scaled[i, si] = x
            canvas[i, si] = x.new_zeros((n, num_classes, ph, pw), dtype=torch.float32)
            count[i, si] = x.new_zeros((1, 1, ph, pw), dtype=torch.float32)
            jobs += [_Job(i, si, y0, x0, f) for (y0, x0) in origins for f in flips]

    def region(job):
        x = scaled[job.image, job.scale]
        return x if not sliding else x[:, :, job.y0:job.y0 + crop, job.x0:job.x0 + crop]

    # Inputs of one shape next to each other (stable: sliding windows keep their order).
    first = {}
    for k, j in enumerate(jobs):
        first.setdefault(tuple(region(j).shape[1:]), k)
    jobs.sort(key=lambda j: first[tuple(region(j).shape[1:])])

    # Consecutive jobs whose inputs have one shape go through the network together.
    start = 0
    while start < len(jobs):
        shape = region(jobs[start]).shape[1:]
        end, size = start, 0
        while end < len(jobs) and region(jobs[end]).shape[1:] == shape:
            n = region(jobs[end]).shape[0]
            if end > start and size + n > max_batch:
                break
            size += n
            end += 1
        chunk = jobs[start:end]
        batch = torch.cat([region(j).flip(-1) if j.flip else region(j) for j in chunk])
        logits = _forward(net, batch, amp_dtype)
        off = 0
        for j in chunk:
            n = region(j).shape[0]
            out = logits[off:off + n]
            off += n
            if j.flip:
                out = out.flip(-1)
            eh, ew = out.shape[-2:]
            canvas[j.image, j.scale][:, :, j.y0:j.y0 + eh, j.x0:j.x0 + ew] += out
            count[j.image, j.scale][:, :, j.y0:j.y0 + eh, j.x0:j.x0 + ew] += 1.0
        start = end

    results = []
    for i, img in enumerate(images):
        n, _, h, w = img.shape
        out = None
        for si, s in enumerate(cfg.scales):
            sh, sw = _scaled_size(h, w, s)
            mean = (canvas[i, si] / count[i, si])[:, :, :sh, :sw]
            if (sh, sw) != (h, w):
                mean = F.interpolate(mean, size=(h, w), mode="bilinear", align_corners=True)
            out = mean if out is None else out + mean
        results.append(out if len(cfg.scales) == 1 else out / len(cfg.scales))
    return results


def predict_logits(net: nn.Module, image: torch.Tensor, cfg: EvalConfig, num_classes: int,
                   amp_dtype=None) -> torch.Tensor:
    """Mean logits (N, C, H, W) of one batch of images at their size (over windows, flips
    and scales, see the module docstring)."""
    return predict_logits_many(net, [image], cfg, num_classes, amp_dtype)[0]


def sliding_logits(net: nn.Module, image: torch.Tensor, crop: int, stride_rate: float,
                   num_classes: int, amp_dtype=None, max_batch: int = 16) -> torch.Tensor:
    """Mean logits (N, C, H, W) of the crop×crop windows at stride ceil(crop·stride_rate),
    all windows batched (at most ``max_batch`` images a forward)."""
    cfg = EvalConfig(mode="sliding", crop_size=crop, stride_rate=stride_rate,
                     max_batch=max_batch)
    return predict_logits_many(net, [image], cfg, num_classes, amp_dtype)[0]


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(nets: dict[str, nn.Module], batches: Iterable, cfg: EvalConfig, num_classes: int,
             ignore_index: int, device: torch.device, amp_dtype=None, backend: str = "auto",
             figures: Optional[Sequence[str]] = None,
             progress: Optional[Callable[[int], None]] = None) -> dict[str, torch.Tensor]:
    """Confusion matrices (C, C) int64 on the device, one per figure: ``"a"`` / ``"b"`` (a
    network of ``nets``) and ``"ensemble"`` (the mean softmax of nets a and b). ``figures``
    defaults to every network of ``nets``.

    Images are gathered until they hold ``cfg.max_batch`` network inputs and predicted
    together; each figure's argmax + confusion matrix is one fused op per image."""
    figures = list(figures) if figures is not None else list(nets)
    if "ensemble" in figures and not {"a", "b"} <= set(nets):
        raise ConfigError("the ensemble figure needs networks a and b")
    run = [k for k in nets if k in figures or "ensemble" in figures]
    was_training = {k: m.training for k, m in nets.items()}
    for m in nets.values():
        m.eval()
    # The loss backend chosen for training may have no confusion-matrix kernel.
    backend = backend if ops.implements("confusion_matrix", backend) else "auto"
    cms = {k: torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
           for k in figures}
    done = 0

    def flush(group):
        nonlocal done
        images = [im for im, _ in group]
        probs = [None] * len(group)
        for k in run:
            logits = predict_logits_many(nets[k], images, cfg, num_classes, amp_dtype)
            for j, (lg, (_, label)) in enumerate(zip(logits, group)):
                if k in cms:
                    cms[k] += ops.confusion_matrix(lg, label, num_classes, ignore_index,
                                                   backend=backend)
                if "ensemble" in cms:
                    p = lg.softmax(1)
                    probs[j] = p if probs[j] is None else probs[j] + p
        if "ensemble" in cms:
            for p, (_, label) in zip(probs, group):
                # argmax of the sum = argmax of the mean of the two softmaxes
                cms["ensemble"] += ops.confusion_matrix(p, label, num_classes, ignore_index,
                                                        backend=backend)
        done += len(group)
        if progress is not None:
            progress(done)

    try:
        group, inputs = [], 0
        for image, label, _sid in batches:
            image = image.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True)
            group.append((image, label))
            inputs += image.shape[0] * inputs_per_image(image.shape[-2], image.shape[-1], cfg)
            if inputs >= cfg.max_batch:
                flush(group)
                group, inputs = [], 0
        if group:
            flush(group)
    finally:
        for k, m in nets.items():
            m.train(was_training[k])
    return cms
