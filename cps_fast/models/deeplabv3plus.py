"""DeepLabv3+ head (ASPP + decoder) and the whole segmentation network.

Layout (the CPS paper's network; widths come from ``ModelConfig``):

    layer4 --ASPP--> [1x1 | 3x3 r1 | 3x3 r2 | 3x3 r3 | image pool] (each A ch) --concat--
           --1x1 proj (A)--> upsample x(OS/4), bilinear, align_corners=True --+
    layer1 --1x1 reduce (L)------------------------------------------------ concat
           --3x3 (D)--3x3 (D)--1x1 classifier--> upsample to the input size (align_corners=True)

Every conv except the classifier is conv (no bias) + BN + ReLU.

Differences from the official CPS ``network.py`` (all deliberate, none changes the function
class except the first):

* The official ASPP uses LeakyReLU (slope 0.01) inside ASPP; we use ReLU as DeepLabv3+ and
  the design notes do. Its pooled branch is added after a separate 1x1 conv instead of being
  concatenated; concat followed by one 1x1 conv is the same linear map.
* No dropout in the official head; ``dropout`` here defaults to 0 (``nn.Identity``).
* The pooled branch is broadcast with ``expand`` rather than bilinearly upsampled from 1x1;
  for a 1x1 source with align_corners=True the two are identical, and ``expand`` is free.

Initialisation (official ``init_weight(business_layer, kaiming_normal_, mode='fan_in',
nonlinearity='relu')``): convs kaiming normal fan_in/relu, BN weight 1 bias 0; the
classifier bias keeps PyTorch's default init, as in the official code.

Runtime properties the engine relies on: ``forward`` has no host-device synchronisation and
no data-dependent shape (only ``x.shape``), so it runs under CUDA-graph capture and
``torch.compile``; it works under ``torch.autocast`` (logits come out in the autocast dtype)
and with channels_last inputs and weights.

Known limit: the image-pooling BN sees one value per channel per image, so training with a
batch of 1 per process raises "Expected more than 1 value per channel" (use >= 2 images per
process, or SyncBatchNorm across processes). Eval with batch 1 is fine (running stats).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .resnet import BN_EPS


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP dilation rates: 6/12/18 at OS16, doubled to 12/24/36 at OS8 (DeepLabv3)."""
    if output_stride not in (8, 16):
        raise ConfigError(f"model.output_stride: {output_stride} is not 8 or 16")
    scale = 16 // output_stride
    return (6 * scale, 12 * scale, 18 * scale)


class ConvBNReLU(nn.Sequential):
    """conv (no bias) -> BN -> ReLU; 'same' padding for any dilation."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, dilation: int = 1,
                 bn_momentum: float = 0.1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS, momentum=bn_momentum),
            nn.ReLU(inplace=True),
        )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch."""

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int],
                 bn_momentum: float = 0.1, dropout: float = 0.0):
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_channels, channels, 1, bn_momentum=bn_momentum)]
            + [ConvBNReLU(in_channels, channels, 3, r, bn_momentum) for r in rates])
        self.pool = ConvBNReLU(in_channels, channels, 1, bn_momentum=bn_momentum)
        self.project = ConvBNReLU(channels * (len(rates) + 2), channels, 1, bn_momentum=bn_momentum)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [branch(x) for branch in self.branches]
        # Global average pool as a mean over H, W: static shape, no sync, graph-capturable.
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True))
        feats.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.dropout(self.project(torch.cat(feats, dim=1)))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the high-level feature, decoder with the low-level one, 1x1 classifier.

    ``forward(low, high)`` returns logits at the low-level (stride 4) resolution.
    """

    def __init__(self, in_channels: int, low_level_in: int, num_classes: int, *,
                 aspp_channels: int = 256, low_level_channels: int = 48,
                 decoder_channels: int = 256, rates: Sequence[int] = (6, 12, 18),
                 bn_momentum: float = 0.1, dropout: float = 0.0):
        super().__init__()
        self.aspp = ASPP(in_channels, aspp_channels, rates, bn_momentum, dropout)
        self.reduce = ConvBNReLU(low_level_in, low_level_channels, 1, bn_momentum=bn_momentum)
        self.fuse = nn.Sequential(
            ConvBNReLU(aspp_channels + low_level_channels, decoder_channels, 3, bn_momentum=bn_momentum),
            ConvBNReLU(decoder_channels, decoder_channels, 3, bn_momentum=bn_momentum),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[2:], mode="bilinear", align_corners=True)
        x = torch.cat([x, self.reduce(low)], dim=1)
        return self.classifier(self.fuse(x))


class DeepLabV3Plus(nn.Module):
    """backbone -> head -> logits upsampled (bilinear, align_corners=True) to the input size.

    Submodules ``backbone`` and ``head`` are public: the optimiser may treat them apart.
    """

    def __init__(self, backbone: nn.Module, head: DeepLabV3PlusHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        logits = self.head(low, high)
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)
