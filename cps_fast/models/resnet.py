"""ResNet backbones for DeepLabv3+: "v1c" as in the official CPS / TorchSemSeg code (the
paper's), and two variants that load the ImageNet files people can actually get.

Variants (``model.backbone``; ``BACKBONES`` below):

* ``resnet50`` / ``resnet101``: v1c, deep stem 64-64-128 (TorchSemSeg's ``deep_stem=True,
  stem_width=64``): what the CPS release's ``resnet50_v1c.pth`` holds, and the paper's.
* ``resnet50_tv`` / ``resnet101_tv``: torchvision's ImageNet ResNet (v1.5): one 7x7/2 conv
  of 64 + BN + ReLU + max-pool, the same bottlenecks (stride on the 3x3) and the same key
  names (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` ... ``fc.*`` ignored).
* ``resnet50_mmseg`` / ``resnet101_mmseg``: mmseg / mmcv's ``ResNetV1c`` (the Bag-of-Tricks
  ResNet-C), deep stem 32-32-64 (``open-mmlab://resnet50_v1c``; its ``stem.*`` keys are
  renamed on loading, see ``pretrained.py``).

All of them feed the same DeepLabv3+ head: the stem differs, the four stages, their output
widths (256 / 2048), strides and the dilation plan below are the same.

v1c means: a deep stem of three 3x3 convolutions (3->w stride 2, w->w, w->2w, each followed
by BN+ReLU; the third one's BN is ``bn1``), a 3x3 max-pool of stride 2, and bottleneck blocks
that put their stride on the 3x3 convolution (v1b), expansion 4.

Module names follow TorchSemSeg's ``furnace/base_model/resnet.py`` so that its ImageNet
files (``resnet50_v1c.pth``, ``resnet101_v1c.pth``) load key for key:

    conv1.0 (conv 3x3 s2)  conv1.1 (BN)  conv1.2 (ReLU)
    conv1.3 (conv 3x3)     conv1.4 (BN)  conv1.5 (ReLU)
    conv1.6 (conv 3x3)     bn1  relu  maxpool
    layer{1..4}.{i}.conv1/bn1/conv2/bn2/conv3/bn3[/downsample.0/downsample.1]

Output stride (OS) is set by replacing strides with dilation, the official way:

* OS16 (the paper's setting): layer4 has stride 1 and its blocks are dilated 2, 4, 8 -- the
  official ``_nostride_dilate`` starts at 2 and doubles per block of layer4, applying the
  block's dilation to every 3x3 conv of the block (including the formerly strided one).
* OS8 (our choice; the CPS code never uses it): layer3 also loses its stride and all its
  blocks are dilated 2; layer4's multi-grid is doubled to 4, 8, 16. That is the OS16 scheme
  with every dilation scaled by the extra factor 2 of resolution, so each layer4 conv sees
  the same receptive field in image pixels as at OS16 (the rule DeepLabv3 uses when it
  doubles the ASPP rates at OS8).

``forward`` returns ``(low, high)``: the layer1 feature (stride 4) for the decoder and the
layer4 feature (stride OS) for ASPP. The attributes ``low_level_channels``, ``out_channels``
and ``output_stride`` describe them, so the head never hard-codes a width.

Initialisation without a pretrained file: convolutions kaiming-normal (fan_out, relu, as
torchvision does), BN weight 1 bias 0, no zero-init of the last BN of a block (the official
code relies on ImageNet weights and has no special init). All init draws from the current
torch RNG, so two networks built under two seeds differ.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError

BN_EPS = 1e-5


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=momentum)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size (up to the stride) for every dilation.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), residual; stride on the 3x3 (v1b)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes, bn_momentum)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = _bn(planes, bn_momentum)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _bn(planes * self.expansion, bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def dilation_plan(layers: Sequence[int], output_stride: int) -> list[tuple[int, tuple[int, ...]]]:
    """Per stage: (stride of its first block, dilation of each block).

    >>> dilation_plan([3, 4, 6, 3], 16)
    [(1, (1, 1, 1)), (2, (1, 1, 1, 1)), (2, (1, 1, 1, 1, 1, 1)), (1, (2, 4, 8))]
    >>> dilation_plan([3, 4, 6, 3], 8)[2:]
    [(1, (2, 2, 2, 2, 2, 2)), (1, (4, 8, 16))]
    """
    if output_stride not in (8, 16):
        raise ConfigError(f"model.output_stride: {output_stride} is not 8 or 16")
    if len(layers) != 4 or any(n < 1 for n in layers):
        raise ConfigError(f"backbone layers {list(layers)}: need 4 stages of >= 1 block")
    l3_stride, l3_dil, l4_base = (2, 1, 2) if output_stride == 16 else (1, 2, 4)
    return [
        (1, (1,) * layers[0]),
        (2, (1,) * layers[1]),
        (l3_stride, (l3_dil,) * layers[2]),
        # multi-grid: the official code doubles the dilation from block to block of layer4
        (1, tuple(l4_base * 2 ** i for i in range(layers[3]))),
    ]


class ResNet(nn.Module):
    """ResNet v1c (deep stem) or v1b (``deep_stem=False``: torchvision's 7x7 stem).

    Args:
        layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        stem_width: width w of the deep stem (w, w, 2w); 64 for the official v1c models.
        planes: bottleneck width of each stage (outputs are 4x that).
        output_stride: 16 or 8 (see the module docstring for the dilations).
        deep_stem: False gives the single 7x7 stem of torchvision's ResNet (64 channels).
        bn_momentum: BatchNorm momentum (PyTorch convention; the paper's 0.1).
    """

    def __init__(self, layers: Sequence[int], *, stem_width: int = 64,
                 planes: Sequence[int] = (64, 128, 256, 512), output_stride: int = 16,
                 deep_stem: bool = True, bn_momentum: float = 0.1):
        super().__init__()
        if len(planes) != 4:
            raise ConfigError(f"backbone planes {list(planes)}: need 4 stages")
        plan = dilation_plan(layers, output_stride)
        self.layers = tuple(layers)
        self.output_stride = output_stride
        self.deep_stem = deep_stem

        if deep_stem:
            # Indices 0..6 match TorchSemSeg's nn.Sequential, so its keys load directly.
            # The third conv's BN+ReLU are ``bn1``/``relu`` below, as in the official code.
            self.conv1 = nn.Sequential(
                _conv3x3(3, stem_width, stride=2), _bn(stem_width, bn_momentum), nn.ReLU(inplace=True),
                _conv3x3(stem_width, stem_width), _bn(stem_width, bn_momentum), nn.ReLU(inplace=True),
                _conv3x3(stem_width, 2 * stem_width),
            )
            stem_out = 2 * stem_width
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            stem_out = 64
        self.bn1 = _bn(stem_out, bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes = stem_out
        for i, (width, (stride, dilations)) in enumerate(zip(planes, plan)):
            stage, inplanes = self._make_layer(inplanes, width, stride, dilations, bn_momentum)
            self.add_module(f"layer{i + 1}", stage)

        self.low_level_channels = planes[0] * Bottleneck.expansion
        self.out_channels = planes[3] * Bottleneck.expansion
        self.reset_parameters()

    @staticmethod
    def _make_layer(inplanes: int, planes: int, stride: int, dilations: Sequence[int],
                    bn_momentum: float) -> tuple[nn.Sequential, int]:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                       _bn(out, bn_momentum))
        blocks = [Bottleneck(inplanes, planes, stride, dilations[0], downsample, bn_momentum)]
        blocks += [Bottleneck(out, planes, 1, d, None, bn_momentum) for d in dilations[1:]]
        return nn.Sequential(*blocks), out

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


# --------------------------------------------------------------------------- factories
# Name -> constructor arguments (the names are config.BACKBONE_NAMES). "tiny" keeps every
# structural rule of the real ones (deep stem, bottlenecks, strides, dilation plan) at ~1/8
# of the width and 1-2 blocks per stage, so that it exercises the same code paths and
# trains on a laptop CPU at 96x96 crops.
_R50, _R101, _PLANES = (3, 4, 6, 3), (3, 4, 23, 3), (64, 128, 256, 512)
BACKBONES = {
    "resnet50": dict(layers=_R50, stem_width=64, planes=_PLANES, deep_stem=True),
    "resnet101": dict(layers=_R101, stem_width=64, planes=_PLANES, deep_stem=True),
    "resnet50_tv": dict(layers=_R50, planes=_PLANES, deep_stem=False),
    "resnet101_tv": dict(layers=_R101, planes=_PLANES, deep_stem=False),
    "resnet50_mmseg": dict(layers=_R50, stem_width=32, planes=_PLANES, deep_stem=True),
    "resnet101_mmseg": dict(layers=_R101, stem_width=32, planes=_PLANES, deep_stem=True),
    "tiny": dict(layers=(1, 1, 2, 2), stem_width=16, planes=(8, 16, 32, 64), deep_stem=True),
}


def build_backbone(name: str, output_stride: int = 16, bn_momentum: float = 0.1,
                   deep_stem: Optional[bool] = None) -> ResNet:
    """A backbone by name (``BACKBONES``); ``deep_stem`` overrides the variant's stem."""
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r} ({', '.join(BACKBONES)})")
    spec = dict(BACKBONES[name])
    if deep_stem is not None:
        spec["deep_stem"] = deep_stem
    return ResNet(**spec, output_stride=output_stride, bn_momentum=bn_momentum)


def resnet50(output_stride: int = 16, bn_momentum: float = 0.1,
             deep_stem: Optional[bool] = None) -> ResNet:
    return build_backbone("resnet50", output_stride, bn_momentum, deep_stem)


def resnet101(output_stride: int = 16, bn_momentum: float = 0.1,
              deep_stem: Optional[bool] = None) -> ResNet:
    return build_backbone("resnet101", output_stride, bn_momentum, deep_stem)


def tiny_resnet(output_stride: int = 16, bn_momentum: float = 0.1) -> ResNet:
    return build_backbone("tiny", output_stride, bn_momentum)
