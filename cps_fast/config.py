"""Typed run configuration.

One dataclass per concern, checked in ``__post_init__`` so that a bad value fails when the
config is built (naming the key), not hours into a run. ``Config.apply_overrides`` takes the
``--set KEY=VALUE`` strings of the command line (``KEY`` is dotted: ``optim.lr=0.02``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, get_args, get_origin, get_type_hints

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# synthetic (v1) and synthetic-v2 are generated; fashion is made of Fashion-MNIST mosaics.
DATASETS = ("synthetic", "synthetic-v2", "fashion", "voc", "cityscapes")


from .errors import ConfigError  # noqa: E402  (re-exported: config users import it from here)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class DataConfig:
    dataset: str = "synthetic-v2"       # one of DATASETS (synthetic = v1)
    root: Optional[str] = None          # data root; None = the synthetic cache directory
    split: str = "1/8"                  # labeled partition: "1/8" or a count such as "183"
    split_dir: Optional[str] = None     # folder of official split lists (train_aug_labeled_1-8.txt ...)
    labeled_list: Optional[str] = None  # explicit list files override split/split_dir
    unlabeled_list: Optional[str] = None
    val_list: Optional[str] = None
    split_seed: int = 0                 # seed of generated partitions
    num_classes: int = 6                # the synthetic set; the VOC and Cityscapes presets set 21, 19
    ignore_index: int = 255
    crop_size: int = 512
    scales: tuple = PAPER_SCALES        # one scale drawn per sample
    flip: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    batch_size: int = 8                 # labeled images per iteration, per process
    unlabeled_batch_size: int = 8       # unlabeled images per iteration, per process
    num_workers: int = 2
    loader: str = "torch"               # torch | dali
    val_max_images: Optional[int] = None  # evaluate on the first N validation images only
    check: str = "fast"                 # data check at start: fast | full | none

    def __post_init__(self):
        _check(self.dataset in DATASETS, "data.dataset",
               f"unknown dataset {self.dataset!r} ({', '.join(DATASETS)})")
        _check(self.num_classes >= 2, "data.num_classes", "needs at least 2 classes")
        _check(0 <= self.ignore_index <= 255 and self.ignore_index >= self.num_classes,
               "data.ignore_index", "must be in [num_classes, 255]")
        _check(self.crop_size >= 16, "data.crop_size", "must be >= 16")
        self.scales = tuple(float(s) for s in self.scales)
        _check(len(self.scales) > 0 and all(s > 0 for s in self.scales), "data.scales",
               "needs positive scales")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        _check(len(self.mean) == 3 and len(self.std) == 3, "data.mean/std", "need 3 values")
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.unlabeled_batch_size >= 0, "data.unlabeled_batch_size", "must be >= 0")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.loader in ("torch", "dali"), "data.loader", "torch or dali")
        _check(self.check in ("fast", "full", "none"), "data.check", "fast, full or none")
        parse_split(self.split)  # raises ConfigError on a bad value


def parse_split(split: str) -> tuple[str, float | int]:
    """'1/8' -> ('fraction', 0.125); '183' -> ('count', 183)."""
    s = str(split).strip()
    try:
        if "/" in s:
            num, den = s.split("/")
            frac = int(num) / int(den)
            if not 0 < frac <= 1:
                raise ValueError
            return "fraction", frac
        n = int(s)
        if n < 1:
            raise ValueError
        return "count", n
    except ValueError:
        raise ConfigError(f"data.split: {split!r} is neither a fraction like 1/8 nor a count like 183")


@dataclass
class ModelConfig:
    backbone: str = "resnet50"          # resnet50 | resnet101 | tiny
    output_stride: int = 16             # 16 or 8
    pretrained: str = "none"            # path to an ImageNet backbone state dict, or "none"
    bn_momentum: float = 0.1
    aspp_channels: int = 256
    decoder_channels: int = 256
    low_level_channels: int = 48
    sync_bn: bool = True                # SyncBatchNorm when world size > 1
    channels_last: bool = False

    def __post_init__(self):
        _check(self.backbone in ("resnet50", "resnet101", "tiny"), "model.backbone",
               f"unknown backbone {self.backbone!r} (resnet50, resnet101, tiny)")
        _check(self.output_stride in (8, 16), "model.output_stride", "8 or 16")
        _check(0 < self.bn_momentum < 1, "model.bn_momentum", "in (0, 1)")


@dataclass
class LossConfig:
    supervised: str = "ce"              # ce | ohem
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 50000          # per process batch
    cps_weight: float = 1.5             # lambda
    cps_rampup: int = 0                 # iterations of sigmoid ramp-up of lambda (0: constant,
                                        # as the paper, whose networks start pretrained)

    def __post_init__(self):
        _check(self.supervised in ("ce", "ohem"), "loss.supervised", "ce or ohem")
        _check(0 < self.ohem_thresh <= 1, "loss.ohem_thresh", "in (0, 1]")
        _check(self.ohem_min_kept >= 1, "loss.ohem_min_kept", "must be >= 1")
        _check(self.cps_weight >= 0, "loss.cps_weight", "must be >= 0")
        _check(self.cps_rampup >= 0, "loss.cps_rampup", "must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 0.01                    # base lr at the reference global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4          # not applied to BN and bias
    poly_power: float = 0.9
    head_lr_mult: float = 1.0           # the official code trains head and backbone alike
    lr_scaling: str = "linear"          # linear | none: scale lr by global batch / reference
    reference_batch: int = 8            # labeled images per iteration the base lr is for

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.lr_scaling in ("linear", "none"), "optim.lr_scaling", "linear or none")


@dataclass
class EvalConfig:
    mode: str = "whole"                 # whole | sliding
    crop_size: int = 512
    stride_rate: float = 2 / 3
    flip: bool = False
    scales: tuple = (1.0,)
    every: int = 0                      # evaluate every N iterations (0: only at the end)
    network: str = "both"               # a | b | both (report each) | ensemble

    def __post_init__(self):
        _check(self.mode in ("whole", "sliding"), "eval.mode", "whole or sliding")
        _check(0 < self.stride_rate <= 1, "eval.stride_rate", "in (0, 1]")
        self.scales = tuple(float(s) for s in self.scales)
        _check(self.every >= 0, "eval.every", "must be >= 0")
        _check(self.network in ("a", "b", "both", "ensemble"), "eval.network",
               "a, b, both or ensemble")


@dataclass
class TrainConfig:
    method: str = "cps"                 # cps | cps-cutmix | supervised
    iters: int = 0                      # 0: derive from epochs over the unlabeled set
    epochs: float = 0.0                 # epochs over the unlabeled set (the paper's count)
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    path: str = "eager"                 # eager | fast (CUDA graph; falls back to eager off CUDA)
    graph_warmup: int = 3               # eager steps before the CUDA graph is captured
    cudnn_benchmark: bool = True        # let cuDNN time its conv algorithms (fixed crops)
    amp: str = "none"                   # none | bf16 | fp16
    kernels: str = "auto"               # auto | torch | triton | cuda | cpp
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_nonfinite: int = 5              # stop after this many non-finite steps in a row
    threads: int = 0                    # torch CPU threads (0: torch's default)

    def __post_init__(self):
        _check(self.method in ("cps", "cps-cutmix", "supervised"), "train.method",
               f"unknown method {self.method!r} (cps, cps-cutmix, supervised)")
        _check(self.iters >= 0, "train.iters", "must be >= 0")
        _check(self.epochs >= 0, "train.epochs", "must be >= 0")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda")
        _check(self.path in ("eager", "fast"), "train.path", "eager or fast")
        _check(self.graph_warmup >= 1, "train.graph_warmup", "must be >= 1")
        _check(self.amp in ("none", "bf16", "fp16"), "train.amp", "none, bf16 or fp16")
        _check(self.kernels in ("auto", "torch", "triton", "cuda", "cpp"), "train.kernels",
               "auto, torch, triton, cuda or cpp")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")


@dataclass
class Config:
    preset: str = "synthetic"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: Optional[str] = None           # run directory

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        kwargs = {}
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            sub = hints[f.name]
            if dataclasses.is_dataclass(sub):
                known = {x.name for x in dataclasses.fields(sub)}
                unknown = set(d[f.name]) - known
                if unknown:
                    raise ConfigError(f"{f.name}: unknown keys {sorted(unknown)}")
                kwargs[f.name] = sub(**{k: _coerce_loaded(v) for k, v in d[f.name].items()})
            else:
                kwargs[f.name] = d[f.name]
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}")
        return cls(**kwargs)

    def apply_overrides(self, items: list[str]) -> "Config":
        """Apply ``KEY=VALUE`` strings; returns a new, re-validated Config."""
        d = self.to_dict()
        for item in items:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            key, raw = item.split("=", 1)
            key = key.strip()
            path = key.split(".")
            node, cls_node = d, Config
            for i, part in enumerate(path):
                hints = get_type_hints(cls_node)
                if part not in hints:
                    known = ", ".join(sorted(hints))
                    raise ConfigError(f"--set {key}: unknown key {part!r} (known: {known})")
                if i == len(path) - 1:
                    node[part] = _parse_value(raw, hints[part], key)
                else:
                    cls_node = hints[part]
                    if not dataclasses.is_dataclass(cls_node):
                        raise ConfigError(f"--set {key}: {part!r} is not a section")
                    node = node[part]
        return Config.from_dict(d)


def _coerce_loaded(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _parse_value(raw: str, typ: Any, key: str) -> Any:
    raw = raw.strip()
    origin = get_origin(typ)
    if origin is not None and type(None) in get_args(typ):  # Optional[X]
        if raw.lower() in ("none", "null", ""):
            return None
        typ = next(a for a in get_args(typ) if a is not type(None))
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is tuple:
            return tuple(float(x) for x in raw.strip("()[]").split(",") if x.strip())
        return raw
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: not a valid {getattr(typ, '__name__', typ)}")
