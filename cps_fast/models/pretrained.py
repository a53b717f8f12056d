"""Load an ImageNet-pretrained backbone from a local file (never downloads).

Accepted files (``torch.save`` of a state dict, read with ``weights_only=True``), each into
the ``model.backbone`` variant of its own layout (``resnet.py``):

* TorchSemSeg / CPS v1c files (``resnet50_v1c.pth``, ``resnet101_v1c.pth``; deep stem
  64-64-128) into ``resnet50`` / ``resnet101``: keys ``conv1.0.weight``, ``conv1.1.*``,
  ``conv1.3.weight``, ``conv1.4.*``, ``conv1.6.weight``, ``bn1.*``, ``layer1.0.conv1.weight``
  ... -- our module names are the same, so they load as is.
* torchvision ImageNet files (``resnet50-0676ba61.pth`` ...; ``conv1.weight`` 7x7, ``bn1.*``,
  ``layer*``, ``fc.*``) into ``resnet50_tv`` / ``resnet101_tv``: the same names.
* mmseg / mmcv ResNetV1c files (``resnet50_v1c-2cccc1ad.pth`` ...; deep stem 32-32-64 named
  ``stem.0`` ... ``stem.7``) into ``resnet50_mmseg`` / ``resnet101_mmseg``: ``stem.{0,1,3,4,6}``
  become ``conv1.{0,1,3,4,6}`` and ``stem.7`` (the third conv's BN) becomes ``bn1``.
* A cps_fast checkpoint (``runs/<run>/checkpoints/best.pt``): the backbone of its first
  network, e.g. to start CPS from a supervised run.
* Any of them wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``, with keys
  prefixed ``module.`` (DataParallel / DDP) and/or ``backbone.`` (a whole segmentation model:
  only the ``backbone.`` keys are used, the rest is reported as ignored).

The variant is read from the file itself (stem kind and width, blocks per stage, stage
widths: ``file_layout``); a file whose layout is another variant's is refused with an error
that names the ``model.backbone`` to choose -- including a ResNet-101 file given to a
ResNet-50 model, which would otherwise load its first blocks and drop the rest.

Keys in the file that the backbone lacks (``fc.*``, head weights) are ignored and reported.
Missing keys are an error, except BN ``num_batches_tracked`` counters (older files lack them).

Errors are one line naming the file: ``ConfigError`` when the path does not exist (it is a
bad ``model.pretrained`` value), ``CheckpointError`` for everything about its contents.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .resnet import BACKBONES

_WRAPPER_KEYS = ("state_dict", "model")
_OPTIONAL_SUFFIX = "num_batches_tracked"
_SHOW = 5  # how many offending keys an error message lists


@dataclass
class LoadReport:
    """What ``load_backbone`` did: keys copied, file keys ignored, optional keys absent."""

    path: str
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    absent_optional: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ign = _head(self.ignored) if self.ignored else "none"
        return (f"pretrained backbone {self.path}: loaded {len(self.loaded)} tensors, "
                f"ignored {len(self.ignored)} file keys ({ign})")


def _head(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - _SHOW})" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _read(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TypeError as exc:  # torch < 1.13 has no weights_only; cps_fast needs >= 2.4
        raise CheckpointError(f"{path}: this torch cannot load it safely ({exc})") from None
    except pickle.UnpicklingError as exc:
        # weights_only refused a non-tensor object. We do not retry with full unpickling:
        # that would run arbitrary code from a downloaded file.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: holds objects other than tensors, refused by torch.load(weights_only=True) "
            f"({first}); re-save it as a plain state dict") from None
    except Exception as exc:  # truncated zip, not a torch file, permission ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {first})") from None


def extract_state_dict(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Unwrap and strip prefixes; returns (backbone state dict, ignored keys)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("nets"), list) and obj["nets"] \
            and "format" in obj:
        # A cps_fast checkpoint (e.g. a supervised run, to start CPS from): network a.
        obj = obj["nets"][0]
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: not a state dict (found {type(obj).__name__})")

    ignored: list[str] = []
    sd: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            ignored.append(str(key))
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        sd[key] = value
    # A whole model (or a CPS branch) saved with its backbone: keep the backbone part only.
    if any(k.startswith("backbone.") for k in sd):
        ignored += [k for k in sd if not k.startswith("backbone.")]
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    return sd, ignored


# mmseg / mmcv's ResNetV1c keeps its deep stem in one Sequential ``stem`` (conv, BN, ReLU
# three times: indices 0..8), the third BN included; TorchSemSeg and we call the first seven
# ``conv1.0`` .. ``conv1.6`` and the third BN ``bn1``.
_MMSEG_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.",
               "stem.4.": "conv1.4.", "stem.6.": "conv1.6.", "stem.7.": "bn1."}


def rename_mmseg_stem(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``stem.N.*`` keys (mmseg / mmcv ResNetV1c) -> our ``conv1.N.*`` / ``bn1.*``."""
    if not any(k.startswith("stem.") for k in sd) or any(k.startswith("conv1.") for k in sd):
        return sd
    out = {}
    for key, value in sd.items():
        for old, new in _MMSEG_STEM.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


@dataclass(frozen=True)
class Layout:
    """What distinguishes the backbone variants, as read from a state dict."""

    stem: str             # "deep" (three 3x3 convs, conv1.0/3/6) or "7x7" (one conv1)
    stem_width: int       # output channels of the stem's first conv
    layers: tuple         # blocks per stage
    planes: tuple         # bottleneck width of each stage (layer{i}.0.conv1 outputs)
    bottleneck: bool = True  # False: basic blocks (ResNet-18/34), which no variant uses

    def describe(self) -> str:
        if not self.bottleneck:
            return f"basic-block ResNet (blocks {list(self.layers)}, as ResNet-18/34)"
        depth = 3 * sum(self.layers) + 2
        if self.stem == "7x7":
            stem = f"7x7 stem, conv1.weight [{self.stem_width}, 3, 7, 7]"
            kind = "torchvision-style"
        else:
            w = self.stem_width
            stem = f"deep stem {w}-{w}-{2 * w}, conv1.0.weight [{w}, 3, 3, 3]"
            kind = "v1c deep-stem"
        widths = "" if self.planes == (64, 128, 256, 512) else f", stage widths {list(self.planes)}"
        return f"{kind} ResNet-{depth} ({stem}{widths})"


def file_layout(sd: Mapping[str, torch.Tensor]) -> Layout | None:
    """The layout of a ResNet state dict (our key names), or None when keys are missing."""
    if "conv1.0.weight" in sd and sd["conv1.0.weight"].dim() == 4:
        stem, width = "deep", int(sd["conv1.0.weight"].shape[0])
    elif "conv1.weight" in sd and sd["conv1.weight"].dim() == 4:
        stem, width = "7x7", int(sd["conv1.weight"].shape[0])
    else:
        return None
    layers, planes = [], []
    for i in range(1, 5):
        prefix = f"layer{i}."
        blocks = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
        blocks = {int(b) for b in blocks if b.isdigit()}
        first = sd.get(f"layer{i}.0.conv1.weight")
        if not blocks or first is None or first.dim() != 4:
            return None
        layers.append(max(blocks) + 1)
        planes.append(int(first.shape[0]))
    return Layout(stem, width, tuple(layers), tuple(planes),
                  bottleneck="layer1.0.conv3.weight" in sd)


def variant_layout(name: str) -> Layout:
    """The layout a ``model.backbone`` variant builds (from ``resnet.BACKBONES``)."""
    spec = BACKBONES[name]
    deep = spec.get("deep_stem", True)
    return Layout("deep" if deep else "7x7", spec.get("stem_width", 64) if deep else 64,
                  tuple(spec["layers"]), tuple(spec["planes"]))


def variant_for(layout: Layout) -> str | None:
    """The ``model.backbone`` whose layout this is, if any."""
    return next((n for n in BACKBONES if variant_layout(n) == layout), None)


def _check_variant(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                   path: str) -> None:
    """Refuse a file of another variant (stem, depth or widths), naming the one to choose."""
    have, want = file_layout(sd), file_layout(target)
    if have is None or want is None or have == want:
        return
    choose = variant_for(have)
    model = variant_for(want)
    model_txt = f"model.backbone={model} is a {want.describe()}" if model else \
        f"the model is a {want.describe()}"
    hint = (f"set model.backbone={choose} to use this file" if choose else
            "no model.backbone takes this file")
    raise CheckpointError(f"{path}: holds a {have.describe()}, but {model_txt}; {hint}")


def _check_stem(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], path: str) -> None:
    """For files too incomplete to have a layout: name a stem that cannot fit."""
    deep_model = "conv1.0.weight" in target
    plain_file = "conv1.weight" in sd and "conv1.0.weight" not in sd
    if deep_model and plain_file:
        raise CheckpointError(
            f"{path}: torchvision-style ResNet stem (conv1.weight {_shape(sd['conv1.weight'])}, a single "
            f"7x7 conv) does not fit the v1c deep stem (conv1.0.weight {_shape(target['conv1.0.weight'])}, "
            f"conv1.3.weight, conv1.6.weight; bn1 of {target['bn1.weight'].shape[0]} channels); "
            f"use model.backbone=resnet50_tv / resnet101_tv for torchvision files")
    if not deep_model and "conv1.0.weight" in sd:
        raise CheckpointError(
            f"{path}: v1c deep-stem file (conv1.0.weight {_shape(sd['conv1.0.weight'])}) does not fit "
            f"a 7x7-stem backbone (conv1.weight {_shape(target['conv1.weight'])}); use "
            f"model.backbone=resnet50 / resnet101 (64-wide stem) or resnet50_mmseg / "
            f"resnet101_mmseg (32-wide) for v1c files")


def load_backbone(backbone: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Copy ImageNet weights from the local file ``path`` into ``backbone``; see the module doc."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"model.pretrained: {path}: no such file (pretrained weights are "
                          f"never downloaded; give a local path, or 'none' to train from "
                          f"scratch)")
    sd, ignored = extract_state_dict(_read(path), path)
    sd = rename_mmseg_stem(sd)
    target = backbone.state_dict()
    _check_variant(sd, target, path)
    _check_stem(sd, target, path)

    missing = [k for k in target if k not in sd and not k.endswith(_OPTIONAL_SUFFIX)]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} backbone keys missing from the file: {_head(missing)}")
    bad = [f"{k} file {_shape(sd[k])} vs model {_shape(target[k])}"
           for k in target if k in sd and sd[k].shape != target[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch: {'; '.join(bad[:3])}"
                              + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))
    nonfinite = [k for k in target if k in sd and sd[k].is_floating_point()
                 and not bool(torch.isfinite(sd[k]).all())]
    if nonfinite:
        raise CheckpointError(f"{path}: non-finite values in {_head(nonfinite)}")

    use = {k: sd[k] for k in target if k in sd}
    backbone.load_state_dict(use, strict=False)  # copies (and casts dtype) in place
    return LoadReport(
        path=path,
        loaded=list(use),
        ignored=ignored + [k for k in sd if k not in target],
        absent_optional=[k for k in target if k not in sd],
    )
