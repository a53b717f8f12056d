"""Load an ImageNet-pretrained backbone from a local file (never downloads).

Accepted files (``torch.save`` of a state dict, read with ``weights_only=True``):

* TorchSemSeg / CPS v1c files (``resnet50_v1c.pth``, ``resnet101_v1c.pth``): keys
  ``conv1.0.weight``, ``conv1.1.*``, ``conv1.3.weight``, ``conv1.4.*``, ``conv1.6.weight``,
  ``bn1.*``, ``layer1.0.conv1.weight`` ... -- our module names are the same, so they load as is.
* torchvision ResNet files (``conv1.weight`` 7x7, ``bn1.*``, ``layer*``): only into a
  plain-stem backbone (``deep_stem=False``); a v1c backbone refuses them with a message
  saying why, because the 7x7 stem has no counterpart in the three-conv deep stem.
* A cps_fast checkpoint (``runs/<run>/checkpoints/best.pt``): the backbone of its first
  network, e.g. to start CPS from a supervised run.
* Either of them wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``, with keys
  prefixed ``module.`` (DataParallel / DDP) and/or ``backbone.`` (a whole segmentation model:
  only the ``backbone.`` keys are used, the rest is reported as ignored).

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


def _check_stem(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], path: str) -> None:
    """Name the one mismatch people hit most: a torchvision file into a v1c model (or back)."""
    deep_model = "conv1.0.weight" in target
    plain_file = "conv1.weight" in sd and "conv1.0.weight" not in sd
    if deep_model and plain_file:
        raise CheckpointError(
            f"{path}: torchvision-style ResNet stem (conv1.weight {_shape(sd['conv1.weight'])}, a single "
            f"7x7 conv) does not fit the v1c deep stem (conv1.0.weight {_shape(target['conv1.0.weight'])}, "
            f"conv1.3.weight, conv1.6.weight; bn1 of {target['bn1.weight'].shape[0]} channels); "
            f"use a v1c file such as TorchSemSeg's resnet50_v1c.pth, or a plain-stem backbone")
    if not deep_model and "conv1.0.weight" in sd:
        raise CheckpointError(
            f"{path}: v1c deep-stem file (conv1.0.weight {_shape(sd['conv1.0.weight'])}) does not fit "
            f"a plain 7x7-stem backbone (conv1.weight {_shape(target['conv1.weight'])})")


def load_backbone(backbone: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Copy ImageNet weights from the local file ``path`` into ``backbone``; see the module doc."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"model.pretrained: {path}: no such file (pretrained weights are "
                          f"never downloaded; give a local path or 'none')")
    sd, ignored = extract_state_dict(_read(path), path)
    target = backbone.state_dict()
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
