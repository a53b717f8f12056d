"""Whole runs as small preset functions.

``synthetic`` (the default, on synthetic-v2) and ``fashion`` (Fashion-MNIST mosaics) train
in minutes on a laptop CPU; ``synthetic-v1`` is the first synthetic set's demo. The paper's runs are
``voc_{r50,r101}_1-{16,8,4,2}`` and ``city_{r50,r101}_1-{16,8,4,2}`` with the settings of
DESIGN.md section 2; ``get(name, method)`` applies the method's CPS weight (CutMix uses
1.0 on VOC and 5 on Cityscapes instead of 1.5 and 6). Their published numbers start from an
ImageNet backbone, so they set ``model.pretrained="required"``: a run refuses to start until
it is given a file (or ``none``, to train from scratch on purpose); see
``check_backbone_start``.

``voc_{r50,r101}_hq{92,183,366,732,1464}`` are VOC's few-label ("high-quality labels")
protocol of PseudoSeg, used by CPS, U2PL and UniMatch: that many labeled images from the
1464 finely annotated train images (``data.labeled_pool=fine``), the rest of train_aug
unlabeled; everything else as the VOC presets (the backbone requirement included).
"""

from __future__ import annotations

import math
import os
from typing import Callable

from .config import (PRETRAINED_NONE, PRETRAINED_REQUIRED, Config, DataConfig, EvalConfig,
                     LossConfig, ModelConfig, OptimConfig, TrainConfig)
from .errors import ConfigError

# Epochs over the unlabeled set, by partition (the paper's counts).
VOC_EPOCHS = {"1/16": 32, "1/8": 34, "1/4": 40, "1/2": 60}
CITY_EPOCHS = {"1/16": 128, "1/8": 137, "1/4": 160, "1/2": 240}
PARTITIONS = {"1-16": "1/16", "1-8": "1/8", "1-4": "1/4", "1-2": "1/2"}
# The few-label protocol: labeled counts drawn from VOC's 1464 fine images (1/16 ... 1/2 of
# them, and all). 30 epochs over the unlabeled set (~39k iterations at batch 8, as the
# train_aug partitions): what the CPS authors trained for these (TorchSemiSeg issue #22).
VOC_FINE_COUNTS = (92, 183, 366, 732, 1464)
VOC_FINE_EPOCHS = 30


def _cpu_demo(preset: str, dataset: str, num_classes: int, method: str) -> Config:
    """The CPU benchmarks' shared settings: tiny DeepLabv3+, 64-pixel crops, 1000 iterations
    from scratch at lr 0.1 (0.02 learns far too slowly in 1000 iterations), the CPS weight
    ramped up over the first quarter (the networks start with nothing to teach); lambda is
    the paper's VOC value, 1.5 (1.0 with CutMix)."""
    return Config(
        preset=preset,
        data=DataConfig(dataset=dataset, num_classes=num_classes, split="1/8", crop_size=64,
                        scales=(0.75, 1.0, 1.25), batch_size=8, unlabeled_batch_size=8,
                        num_workers=1),
        # channels_last: ~20 % faster for the tiny net on the CPU.
        model=ModelConfig(backbone="tiny", aspp_channels=64, decoder_channels=64,
                          low_level_channels=16, channels_last=True),
        loss=LossConfig(cps_weight=1.0 if method == "cps-cutmix" else 1.5, cps_rampup=250),
        optim=OptimConfig(lr=0.1),
        eval=EvalConfig(mode="whole", every=500),
        train=TrainConfig(method=method, iters=1000, log_every=25, checkpoint_every=500),
    )


def synthetic(method: str = "cps") -> Config:
    """CPS on the built-in synthetic-v2 set (appearance modes that a few labels miss):
    minutes on a 2-core CPU."""
    return _cpu_demo("synthetic", "synthetic-v2", 6, method)


def synthetic_v1(method: str = "cps") -> Config:
    """The first synthetic set (shape + texture under clutter; not label-limited: CPS does
    not help there, see the README), at the settings its records were measured with."""
    return Config(
        preset="synthetic-v1",
        data=DataConfig(dataset="synthetic", num_classes=6, split="1/8", crop_size=96,
                        scales=(0.75, 1.0, 1.25, 1.5), batch_size=8, unlabeled_batch_size=8,
                        num_workers=1),
        model=ModelConfig(backbone="tiny", aspp_channels=64, decoder_channels=64,
                          low_level_channels=16, channels_last=True),
        loss=LossConfig(cps_weight=1.0 if method == "cps-cutmix" else 1.5),
        optim=OptimConfig(lr=0.02),
        eval=EvalConfig(mode="whole", every=400),
        train=TrainConfig(method=method, iters=1200, log_every=25, checkpoint_every=400),
    )


def fashion(method: str = "cps") -> Config:
    """CPS on Fashion-MNIST mosaics (real photographs, exact masks; needs the Debian
    package dataset-fashion-mnist or $CPS_FAST_FASHION_MNIST), at the synthetic preset's
    settings."""
    return _cpu_demo("fashion", "fashion", 11, method)


def _voc(backbone: str, partition: str, method: str) -> Config:
    return Config(
        preset=f"voc_{backbone}_{partition}",
        data=DataConfig(dataset="voc", num_classes=21, split=PARTITIONS[partition],
                        crop_size=512, batch_size=8, unlabeled_batch_size=8, num_workers=4),
        model=ModelConfig(backbone={"r50": "resnet50", "r101": "resnet101"}[backbone],
                          pretrained=PRETRAINED_REQUIRED),
        loss=LossConfig(supervised="ce", cps_weight=1.0 if method == "cps-cutmix" else 1.5),
        optim=OptimConfig(lr=0.01),
        eval=EvalConfig(mode="sliding", crop_size=512, every=5000),
        train=TrainConfig(method=method, epochs=VOC_EPOCHS[PARTITIONS[partition]],
                          log_every=50, checkpoint_every=2000),
    )


def _voc_fine(backbone: str, count: int, method: str) -> Config:
    return _voc(backbone, "1-8", method).apply_overrides(
        [f"preset=voc_{backbone}_hq{count}", f"data.split={count}", "data.labeled_pool=fine",
         f"train.epochs={VOC_FINE_EPOCHS}"])


def _city(backbone: str, partition: str, method: str) -> Config:
    return Config(
        preset=f"city_{backbone}_{partition}",
        data=DataConfig(dataset="cityscapes", num_classes=19, split=PARTITIONS[partition],
                        crop_size=800, batch_size=8, unlabeled_batch_size=8, num_workers=4),
        model=ModelConfig(backbone={"r50": "resnet50", "r101": "resnet101"}[backbone],
                          pretrained=PRETRAINED_REQUIRED),
        loss=LossConfig(supervised="ohem", ohem_thresh=0.7, ohem_min_kept=50000,
                        cps_weight=5.0 if method == "cps-cutmix" else 6.0),
        optim=OptimConfig(lr=0.02),
        eval=EvalConfig(mode="sliding", crop_size=800, stride_rate=2 / 3, every=5000),
        train=TrainConfig(method=method, epochs=CITY_EPOCHS[PARTITIONS[partition]],
                          log_every=50, checkpoint_every=2000),
    )


def _registry() -> dict[str, Callable[[str], Config]]:
    reg: dict[str, Callable[[str], Config]] = {"synthetic": synthetic,
                                                "synthetic-v1": synthetic_v1, "fashion": fashion}
    for bb in ("r50", "r101"):
        for part in PARTITIONS:
            reg[f"voc_{bb}_{part}"] = lambda m, bb=bb, part=part: _voc(bb, part, m)
            reg[f"city_{bb}_{part}"] = lambda m, bb=bb, part=part: _city(bb, part, m)
        for n in VOC_FINE_COUNTS:
            reg[f"voc_{bb}_hq{n}"] = lambda m, bb=bb, n=n: _voc_fine(bb, n, m)
    return reg


PRESETS = _registry()

# The method a preset trains when none is asked for. The default demo (``python -m
# cps_fast.train``: the synthetic preset) trains CPS + CutMix, the method that beats the
# supervised baseline on synthetic-v2 (benchmarks/results/semisup_synthetic-v2.jsonl:
# +4.4 mIoU at 1/8 over 3 paired seeds, where plain CPS gains +0.7); the paper presets train
# plain CPS, as the paper's headline tables do.
DEFAULT_METHODS = {"synthetic": "cps-cutmix"}


def default_method(name: str) -> str:
    """The method preset ``name`` trains unless ``--method`` / a run file says otherwise."""
    return DEFAULT_METHODS.get(name, "cps")


def get(name: str, method: str = "cps") -> Config:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown preset (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name](method)


def iterations(cfg: Config, num_labeled: int, num_unlabeled: int, world_size: int = 1) -> int:
    """Total iterations: ``train.iters`` if set, else epochs over the larger split at the
    global batch (the official ``max_samples // batch_size`` per epoch)."""
    if cfg.train.iters > 0:
        return cfg.train.iters
    if cfg.train.epochs <= 0:
        raise ConfigError("train.iters and train.epochs are both 0: set one of them")
    per_iter = cfg.data.batch_size * world_size
    per_epoch = max(num_labeled, num_unlabeled) // per_iter
    return max(1, int(math.ceil(cfg.train.epochs * max(per_epoch, 1))))


# The ImageNet file each backbone variant loads; the README ("Backbone weights") says where
# each comes from.
BACKBONE_FILES = {
    "resnet50": "resnet50_v1c.pth, the CPS release's v1c deep-stem ResNet-50",
    "resnet101": "resnet101_v1c.pth, the CPS release's v1c deep-stem ResNet-101",
    "resnet50_tv": "torchvision's resnet50-0676ba61.pth (or -11ad3fa6)",
    "resnet101_tv": "torchvision's resnet101-63fe2227.pth (or -cd907fc2)",
    "resnet50_mmseg": "mmcv's resnet50_v1c-2cccc1ad.pth",
    "resnet101_mmseg": "mmcv's resnet101_v1c-e67eebb6.pth",
}


def check_backbone_start(cfg: Config) -> None:
    """Refuse to start a run whose preset needs an ImageNet backbone and was given none, or
    whose backbone file does not exist: one line, before any data is read."""
    value = cfg.model.pretrained
    if value == PRETRAINED_REQUIRED:
        bb = cfg.model.backbone
        depth = "101" if "101" in bb else "50"
        expects = BACKBONE_FILES.get(bb, "an ImageNet ResNet state dict")
        other = (f"; a torchvision file needs --set model.backbone=resnet{depth}_tv, an "
                 f"mmcv one resnet{depth}_mmseg (README: Backbone weights)"
                 if bb in ("resnet50", "resnet101") else "")
        raise ConfigError(
            f"model.pretrained: preset {cfg.preset} starts from an ImageNet backbone (its "
            f"published numbers assume one): give --set model.pretrained=PATH to {expects}"
            f"{other}; or --set model.pretrained=none to train from scratch on purpose")
    if value != PRETRAINED_NONE and not os.path.isfile(value):
        raise ConfigError(f"model.pretrained: {value}: no such file (backbone weights are never "
                          f"downloaded; give a local path, or 'none' to train from scratch)")
