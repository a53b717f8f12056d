"""Segmentation networks: DeepLabv3+ on ResNet-50/101 (v1c, torchvision or mmseg stem;
see ``resnet.py``) or a tiny CPU backbone.

    model = build_model(cfg.model, num_classes)   # draws init from the current torch RNG
    logits = model(images)                        # (N, num_classes, H, W), H, W of the input

CPS builds its two networks with two calls under two seeds (``torch.manual_seed``), so their
heads (and, without a pretrained file, backbones) start differently.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PRETRAINED_NONE, PRETRAINED_REQUIRED, ModelConfig
from ..errors import ConfigError
from .deeplabv3plus import ASPP, DeepLabV3Plus, DeepLabV3PlusHead, aspp_rates
from .pretrained import Layout, LoadReport, file_layout, load_backbone, variant_for
from .resnet import BACKBONES, Bottleneck, ResNet, build_backbone, dilation_plan

__all__ = [
    "build_model", "count_parameters", "load_backbone", "LoadReport", "Layout", "file_layout",
    "variant_for",
    "DeepLabV3Plus", "DeepLabV3PlusHead", "ASPP", "aspp_rates",
    "ResNet", "Bottleneck", "build_backbone", "dilation_plan", "BACKBONES",
]


def build_model(cfg: ModelConfig, num_classes: int) -> DeepLabV3Plus:
    """DeepLabv3+ as ``cfg`` describes, on the CPU, in float32, in training mode.

    Loads the backbone from ``cfg.pretrained`` unless it is ``"none"`` (the load report is
    kept as ``model.pretrained_report`` for logging; ``"required"``, a paper preset's
    placeholder, is refused); converts to channels_last when ``cfg.channels_last``.
    SyncBatchNorm (``cfg.sync_bn``) is left to the distributed wrapper, which knows the
    process group.
    """
    if num_classes < 1:
        raise ConfigError(f"data.num_classes: {num_classes} is not a positive class count")
    for key in ("aspp_channels", "decoder_channels", "low_level_channels"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key}: must be >= 1 (got {getattr(cfg, key)})")
    if cfg.pretrained == PRETRAINED_REQUIRED:
        # The Trainer refuses this before reading any data (presets.check_backbone_start);
        # this guards other callers.
        raise ConfigError("model.pretrained: this preset needs an ImageNet backbone file "
                          "(--set model.pretrained=PATH), or 'none' to train from scratch")

    backbone = build_backbone(cfg.backbone, cfg.output_stride, cfg.bn_momentum)
    head = DeepLabV3PlusHead(
        backbone.out_channels, backbone.low_level_channels, num_classes,
        aspp_channels=cfg.aspp_channels, low_level_channels=cfg.low_level_channels,
        decoder_channels=cfg.decoder_channels, rates=aspp_rates(cfg.output_stride),
        bn_momentum=cfg.bn_momentum)
    model = DeepLabV3Plus(backbone, head)

    model.pretrained_report = None
    if cfg.pretrained != PRETRAINED_NONE:
        model.pretrained_report = load_backbone(model.backbone, cfg.pretrained)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
