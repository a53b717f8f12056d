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
# Training scales: the paper's supplementary, and what the official code uses
# (``C.train_scale_array``); ``--set data.scales=paper|official`` names either.
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# synthetic (v1) and synthetic-v2 are generated; fashion is made of Fashion-MNIST mosaics.
DATASETS = ("synthetic", "synthetic-v2", "fashion", "voc", "cityscapes")
OFFICIAL_SCALES = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
SCALE_SETS = {"paper": PAPER_SCALES, "official": OFFICIAL_SCALES}

# model.backbone values (cps_fast/models/resnet.py BACKBONES builds them; a test keeps the
# two lists equal): v1c deep stem 64-64-128 (CPS / TorchSemiSeg, the paper's), torchvision's
# 7x7 stem (``_tv``), mmseg's ResNetV1c deep stem 32-32-64 (``_mmseg``), and a tiny CPU one.
BACKBONE_NAMES = ("resnet50", "resnet101", "resnet50_tv", "resnet101_tv",
                  "resnet50_mmseg", "resnet101_mmseg", "tiny")
# model.pretrained sentinels: a paper preset sets REQUIRED, which a run refuses to start
# with (the published numbers assume an ImageNet backbone); NONE is an explicit choice to
# train from scratch, and it is what config.json then records.
PRETRAINED_REQUIRED = "required"
PRETRAINED_NONE = "none"
# train.compile: auto | off | an Inductor mode (engine/compiled.py)
COMPILE_CHOICES = ("auto", "off", "default", "max-autotune")


from .errors import ConfigError  # noqa: E402  (re-exported: config users import it from here)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _scales(value: Any, key: str, named: dict[str, tuple] | None = None) -> tuple:
    """A tuple of positive floats, or (for ``data.scales``) the name of a set."""
    if isinstance(value, str):
        name = value.strip().lower()
        if named and name in named:
            return tuple(named[name])
        known = f" or one of {', '.join(named)}" if named else ""
        raise ConfigError(f"{key}: {value!r} is not a list of numbers{known}")
    try:
        out = tuple(float(s) for s in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a list of numbers") from None
    _check(len(out) > 0 and all(s > 0 for s in out), key, "needs positive scales")
    return out


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
    labeled_pool: str = "train"         # train | fine: draw labeled images from the whole train
                                        # list, or (VOC) from the 1464 finely annotated ones
    num_classes: int = 6                # the synthetic set; the VOC and Cityscapes presets set 21, 19
    ignore_index: int = 255
    crop_size: int = 512
    scales: tuple = PAPER_SCALES        # one scale drawn per sample; "paper" | "official" | a list
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
        self.scales = _scales(self.scales, "data.scales", SCALE_SETS)  # stored resolved
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        _check(len(self.mean) == 3 and len(self.std) == 3, "data.mean/std", "need 3 values")
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.unlabeled_batch_size >= 0, "data.unlabeled_batch_size", "must be >= 0")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.loader in ("torch", "dali"), "data.loader", "torch or dali")
        _check(self.check in ("fast", "full", "none"), "data.check", "fast, full or none")
        _check(self.labeled_pool in ("train", "fine"), "data.labeled_pool",
               f"train or fine, not {self.labeled_pool!r}")
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
    backbone: str = "resnet50"          # one of BACKBONE_NAMES (resnet50: v1c, the paper's)
    output_stride: int = 16             # 16 or 8
    pretrained: str = PRETRAINED_NONE   # path to an ImageNet backbone state dict; "none":
                                        # from scratch; "required": a path must be given
    bn_momentum: float = 0.1
    aspp_channels: int = 256
    decoder_channels: int = 256
    low_level_channels: int = 48
    sync_bn: bool = True                # SyncBatchNorm when world size > 1
    channels_last: bool = False

    def __post_init__(self):
        _check(self.backbone in BACKBONE_NAMES, "model.backbone",
               f"unknown backbone {self.backbone!r} ({', '.join(BACKBONE_NAMES)})")
        # An empty value (e.g. an unset shell variable in --set model.pretrained=$W) must
        # not quietly mean "from scratch": that is only ever said with "none".
        self.pretrained = str(self.pretrained).strip()
        _check(self.pretrained != "", "model.pretrained",
               "empty; give a backbone file, or 'none' to train from scratch")
        if self.pretrained.lower() in (PRETRAINED_NONE, PRETRAINED_REQUIRED):
            self.pretrained = self.pretrained.lower()
        _check(self.output_stride in (8, 16), "model.output_stride", "8 or 16")
        _check(0 < self.bn_momentum < 1, "model.bn_momentum", "in (0, 1)")


@dataclass
class LossConfig:
    supervised: str = "ce"              # ce | ohem
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 50000          # per image (official: 50000 x images per GPU, 1 image
                                        # per GPU), independent of the batch and GPU count
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
    """How validation mIoU is measured; printed and stored with every figure (the protocol).

    ``network`` says which figures are computed: ``all`` = network a, network b and their
    ensemble (mean softmax), ``both`` = a and b, or one of ``a`` / ``b`` / ``ensemble``.
    ``select`` says which of them is the headline ``miou`` and picks ``best.pt``: ``a`` as
    the official CPS evaluation (it reports network 1), or ``b`` / ``ensemble`` / ``max``
    (the best of those computed: optimistic, not the paper's protocol)."""
    mode: str = "whole"                 # whole | sliding
    crop_size: int = 512
    stride_rate: float = 2 / 3
    flip: bool = False
    scales: tuple = (1.0,)
    every: int = 0                      # evaluate every N iterations (0: only at the end)
    network: str = "all"                # all | both | a | b | ensemble
    select: str = "a"                   # a | b | ensemble | max: the headline miou, best.pt
    max_batch: int = 16                 # network inputs (windows) per forward in evaluation

    def __post_init__(self):
        _check(self.mode in ("whole", "sliding"), "eval.mode", "whole or sliding")
        _check(self.crop_size >= 1, "eval.crop_size", "must be >= 1")
        _check(0 < self.stride_rate <= 1, "eval.stride_rate", "in (0, 1]")
        self.scales = _scales(self.scales, "eval.scales")
        _check(self.every >= 0, "eval.every", "must be >= 0")
        _check(self.network in ("all", "both", "a", "b", "ensemble"), "eval.network",
               "all, both, a, b or ensemble")
        _check(self.select in ("a", "b", "ensemble", "max"), "eval.select",
               "a, b, ensemble or max")
        _check(self.max_batch >= 1, "eval.max_batch", "must be >= 1")


@dataclass
class TrainConfig:
    method: str = "cps"                 # cps | cps-cutmix | supervised
    iters: int = 0                      # 0: derive from epochs over the unlabeled set
    epochs: float = 0.0                 # epochs over the unlabeled set (the paper's count)
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    path: str = "eager"                 # eager | fast (CUDA graph; falls back to eager off CUDA)
    graph_warmup: int = 3               # eager steps before the CUDA graph is captured
    compile: str = "auto"               # the fast step's networks + losses by TorchInductor:
                                        # auto (on for --path fast on CUDA) | off | default |
                                        # max-autotune (Inductor's own CUDA graphs always off)
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
        _check(self.compile in COMPILE_CHOICES, "train.compile",
               f"{self.compile!r}: expected one of {', '.join(COMPILE_CHOICES)}")
        _check(self.path == "fast" or self.compile in ("auto", "off"), "train.compile",
               f"{self.compile} applies to train.path=fast (the eager path is the reference); "
               f"set train.path=fast or train.compile=off")
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
            node, leaf, typ = _locate(d, key, f"--set {key}")
            node[leaf] = _parse_value(raw, typ, key)
        return Config.from_dict(d)

    def apply_values(self, values: dict, source: str) -> "Config":
        """Apply already-typed values ``{dotted key: value}`` (a run file's, see
        cps_fast/runfile.py); returns a new, re-validated Config. Every error names the key
        and ``source``."""
        d = self.to_dict()
        try:
            for key, value in values.items():
                node, leaf, typ = _locate(d, key, key)
                node[leaf] = _coerce_value(value, typ, key)
            return Config.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _locate(d: dict, key: str, label: str) -> tuple:
    """(dict holding the leaf, leaf name, its type) of dotted ``key`` in ``d`` (a Config's
    to_dict()); unknown keys raise ConfigError starting with ``label``."""
    path = key.split(".")
    node, cls_node = d, Config
    for i, part in enumerate(path):
        hints = get_type_hints(cls_node)
        if part not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{label}: unknown key {part!r} (known: {known})")
        if i == len(path) - 1:
            return node, part, hints[part]
        cls_node = hints[part]
        if not dataclasses.is_dataclass(cls_node):
            raise ConfigError(f"{label}: {part!r} is not a section")
        node = node[part]
    raise ConfigError(f"{label}: empty key")  # unreachable: split() gives >= 1 part


def _coerce_loaded(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _coerce_value(value: Any, typ: Any, key: str) -> Any:
    """A value as YAML/JSON typed it, checked against the field's type: strings are parsed
    as ``--set`` parses them; a number is no bool, an int field takes no 2.5."""
    declared, origin = typ, get_origin(typ)
    if origin is not None and type(None) in get_args(typ):  # Optional[X]
        if value is None:
            return None
        typ = next(a for a in get_args(typ) if a is not type(None))
    name = getattr(typ, "__name__", str(typ))
    bad = ConfigError(f"{key}: {value!r} is not a valid {name}")
    if isinstance(value, str):
        try:
            return _parse_value(value, declared, key)
        except ConfigError:
            raise bad from None
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is bool and isinstance(value, bool):
        return value
    if typ is int and is_num and float(value).is_integer():
        return int(value)
    if typ is float and is_num:
        return float(value)
    if typ is str and is_num:  # data.split: 183 in YAML is an int
        return str(value)
    if typ is tuple and isinstance(value, (list, tuple)):
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            return tuple(float(x) for x in value)
    raise bad


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
            if raw and (raw[0].isalpha() or raw[0] == "_"):
                return raw  # a named set (data.scales=official): the dataclass resolves it
            return tuple(float(x) for x in raw.strip("()[]").split(",") if x.strip())
        return raw
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: not a valid {getattr(typ, '__name__', typ)}")
