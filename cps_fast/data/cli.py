"""``python -m cps_fast.data splits|check|preview|prepare`` — the data command line.

    splits   write labeled / unlabeled lists for each partition asked, so that a run can be
             repeated exactly: --format cps (default) in the CPS file naming
             (train_aug_labeled_1-8.txt; pseudoseg_labeled_92.txt for data.labeled_pool=fine),
             --format unimatch as UniMatch's <split>/{labeled,unlabeled}.txt + val.txt
    check    scan the dataset and report every problem at once (exit 1 if any)
    preview  write N augmented training samples as PNGs (image | colour label)
    prepare  generate the synthetic sets or the Fashion-MNIST mosaics; for Cityscapes write
             *_labelTrainIds.png

Errors (``CpsFastError``) print one line ``error: <message>`` on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import numpy as np

from ..config import DATASETS, Config
from ..errors import CpsFastError, DataError


# --------------------------------------------------------------------------- config


def base_config(preset: Optional[str], config_file: Optional[str] = None) -> Config:
    """The starting Config: a named preset (cps_fast.presets) or the defaults, with a run
    file (``--config``, YAML or JSON, see cps_fast/runfile.py) applied on top."""
    from ..runfile import build_config
    return build_config(preset, None, config_file, default_preset=None)


def config_from_args(args: argparse.Namespace) -> Config:
    """Apply --config, --dataset, --data-root, --split, --split-seed, --split-dir and --set
    to a preset's (or the default) Config."""
    from .datasets import dataset_num_classes

    preset, config_file = getattr(args, "preset", None), getattr(args, "config", None)
    cfg = base_config(preset, config_file)
    items = [f"preset={preset}"] if preset else []
    sets = list(args.set or [])
    if args.dataset:
        items.append(f"data.dataset={args.dataset}")
        # Convenience: follow the dataset's class count unless --set gives one.
        if not any(s.strip().startswith("data.num_classes=") for s in sets):
            items.append(f"data.num_classes={dataset_num_classes(args.dataset)}")
    elif not preset and not config_file and not any(
            s.strip().startswith("data.num_classes=") for s in sets):
        items.append(f"data.num_classes={dataset_num_classes(cfg.data.dataset)}")
    if args.data_root:
        items.append(f"data.root={args.data_root}")
    split = getattr(args, "split", None)
    if isinstance(split, list):
        split = split[0] if split else None
    if split:
        items.append(f"data.split={split}")
    if args.split_seed is not None:
        items.append(f"data.split_seed={args.split_seed}")
    if args.split_dir:
        items.append(f"data.split_dir={args.split_dir}")
    return cfg.apply_overrides(items + sets)


def _common(p: argparse.ArgumentParser, multi_split: bool = False) -> None:
    p.add_argument("--preset", help="start from a preset of cps_fast.presets")
    p.add_argument("--config", metavar="FILE",
                   help="run file (YAML or JSON, e.g. a run's config.json) applied on top of "
                        "the preset; the options below apply on top of it")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-root", help="dataset root directory")
    if multi_split:
        p.add_argument("--split", nargs="+", help="partitions: 1/16 1/8 ... or counts such as 183")
    else:
        p.add_argument("--split", help="labeled partition: 1/8 or a count such as 183")
    p.add_argument("--split-seed", type=int, help="seed of generated partitions")
    p.add_argument("--split-dir", help="folder of official split lists")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. data.crop_size=321 (repeatable)")


# --------------------------------------------------------------------------- commands


def cmd_splits(args) -> int:
    from .datasets import build_splits
    from .splits import split_tag, unimatch_tag, write_list

    cfg = config_from_args(args)
    os.makedirs(args.out, exist_ok=True)
    root = None
    for split in (args.split or [cfg.data.split]):
        over = [f"data.split={split}", "data.split_dir=none", "data.labeled_list=none",
                "data.unlabeled_list=none"]
        sp = build_splits(cfg.apply_overrides(over).data)
        root = sp.sources["root"]
        if args.format == "unimatch":  # splits/<dataset>/<n>/{labeled,unlabeled}.txt
            folder = os.path.join(args.out, unimatch_tag(split))
            names = {k: os.path.join(folder, f"{k}.txt") for k in ("labeled", "unlabeled")}
            shown = f"{folder}/{{labeled,unlabeled}}.txt"
            fmt = "unimatch"
        else:  # the CPS naming; the official Cityscapes lists hold paths, VOC's bare ids
            prefix = "pseudoseg" if cfg.data.labeled_pool == "fine" else "train_aug"
            tag = split_tag(split)
            names = {k: os.path.join(args.out, f"{prefix}_{k}_{tag}.txt")
                     for k in ("labeled", "unlabeled")}
            shown = f"{args.out}/{prefix}_{{labeled,unlabeled}}_{tag}.txt"
            fmt = "cps" if cfg.data.dataset == "cityscapes" else "ids"
        for kind, samples in (("labeled", sp.labeled), ("unlabeled", sp.unlabeled)):
            write_list(names[kind], samples, root, fmt=fmt)
        print(f"split {split} (seed {cfg.data.split_seed}, {cfg.data.labeled_pool} pool): "
              f"{len(sp.labeled)} labeled, {len(sp.unlabeled)} unlabeled -> {shown}")
    if args.format == "unimatch" and root is not None:  # UniMatch keeps val.txt beside them
        write_list(os.path.join(args.out, "val.txt"), sp.val, root, fmt="unimatch")
    return 0


def cmd_check(args) -> int:
    from .check import check_dataset
    from .datasets import build_splits

    cfg = config_from_args(args)
    sp = build_splits(cfg.data, strict=False)
    mode = "fast" if args.fast else "full"
    problems = check_dataset(sp, mode, workers=args.workers)
    for p in problems:
        print(f"problem: {p}")
    print(f"{cfg.data.dataset} at {sp.sources.get('root')} ({mode} check): {len(sp.labeled)} labeled, "
          f"{len(sp.unlabeled)} unlabeled, {len(sp.val)} val; {len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_preview(args) -> int:
    from PIL import Image

    from .datasets import build_splits
    from .loader import TrainStream
    from .transforms import colorize, denormalize

    cfg = config_from_args(args)
    d = cfg.apply_overrides(["data.num_workers=0"]).data
    sp = build_splits(d)
    samples = sp.labeled if args.stream == "labeled" else sp.unlabeled
    if d.loader == "dali":  # the same samples and draws through the DALI pipeline
        from .dali import DaliTrainStream
        stream = DaliTrainStream(samples, sp.info, d, 1, args.seed, args.stream,
                                 with_labels=args.stream == "labeled", device="cpu")
    else:
        stream = TrainStream(samples, sp.info, d, 1, args.seed, args.stream,
                             with_labels=args.stream == "labeled")
    os.makedirs(args.out, exist_ok=True)
    for i in range(args.n):
        b = next(stream)
        img = denormalize(b["image"][0], d.mean, d.std)
        if "label" in b:
            lab = colorize(b["label"][0].numpy(), sp.info.palette)
            img = np.concatenate([img, np.full((img.shape[0], 4, 3), 255, np.uint8), lab], 1)
        Image.fromarray(img).save(os.path.join(args.out, f"preview_{i:03d}.png"))
    stream.close()
    print(f"wrote {args.n} augmented {args.stream} samples to {args.out}")
    return 0


def cmd_prepare(args) -> int:
    cfg = config_from_args(args)
    d = cfg.data
    if d.dataset == "synthetic":
        from .synthetic import (DEFAULT_SEED, DEFAULT_TRAIN, DEFAULT_VAL, default_synthetic_root,
                                ensure_synthetic, generate_synthetic)
        root = d.root or default_synthetic_root()
        n_train = args.n_train if args.n_train is not None else DEFAULT_TRAIN
        n_val = args.n_val if args.n_val is not None else DEFAULT_VAL
        seed = args.seed if args.seed is not None else DEFAULT_SEED
        if args.force:
            generate_synthetic(root, n_train, n_val, seed)
        else:
            ensure_synthetic(root, n_train, n_val, seed)
        print(f"synthetic dataset ready: {root} ({n_train} train, {n_val} val)")
        return 0
    if d.dataset in ("synthetic-v2", "fashion"):
        from . import fashion, synthetic_v2
        mod = synthetic_v2 if d.dataset == "synthetic-v2" else fashion
        root = d.root or mod.default_root()
        n_train = args.n_train if args.n_train is not None else mod.DEFAULT_TRAIN
        n_val = args.n_val if args.n_val is not None else mod.DEFAULT_VAL
        seed = args.seed if args.seed is not None else mod.DEFAULT_SEED
        extra = {"source": args.source} if d.dataset == "fashion" else {}
        if args.force:
            mod.generate(root, n_train=n_train, n_val=n_val, seed=seed, **extra)
        else:
            mod.ensure(root, n_train, n_val, seed, **extra)
        print(f"{d.dataset} dataset ready: {root} ({n_train} train, {n_val} val)")
        return 0
    if d.dataset == "cityscapes":
        if not args.trainids:
            print("cityscapes: nothing to do (pass --trainids to write *_labelTrainIds.png)")
            return 0
        n = write_cityscapes_trainids(d.root, overwrite=args.force)
        print(f"wrote {n} *_gtFine_labelTrainIds.png files under {d.root}/gtFine")
        return 0
    print(f"{d.dataset}: nothing to prepare (point --data-root at VOCdevkit or the CPS layout)")
    return 0


def write_cityscapes_trainids(root: Optional[str], overwrite: bool = False) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` beside every ``*_gtFine_labelIds.png``."""
    from PIL import Image

    from .cityscapes_labels import labelid_to_trainid_lut
    from .io import read_label

    if not root or not os.path.isdir(os.path.join(root, "gtFine")):
        raise DataError(f"{root}/gtFine: Cityscapes label directory not found")
    lut, n = labelid_to_trainid_lut(255), 0
    for dirpath, _, files in os.walk(os.path.join(root, "gtFine")):
        for f in sorted(files):
            if not f.endswith("_gtFine_labelIds.png"):
                continue
            out = os.path.join(dirpath, f.replace("_labelIds.png", "_labelTrainIds.png"))
            if os.path.exists(out) and not overwrite:
                continue
            # labelIds range over 0..33 (and -1 as 255 in some tools): all valid raw values.
            arr = read_label(os.path.join(dirpath, f), lut, 19, 255)
            tmp = out + f".tmp{os.getpid()}"
            Image.fromarray(arr).save(tmp, format="PNG")
            os.replace(tmp, out)
            n += 1
    return n


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cps_fast.data",
                                 description="cps_fast data tools: splits, check, preview, prepare")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("splits", help="write labeled/unlabeled lists for partitions")
    _common(p, multi_split=True)
    p.add_argument("--out", required=True, help="folder for the list files")
    p.add_argument("--format", choices=("cps", "unimatch"), default="cps",
                   help="cps: train_aug_{labeled,unlabeled}_1-8.txt (bare ids for VOC, "
                        "/image<TAB>/label for Cityscapes); unimatch: <split>/"
                        "{labeled,unlabeled}.txt of 'image label' lines, and val.txt")
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser("check", help="validate the dataset, report every problem")
    _common(p)
    p.add_argument("--fast", action="store_true", help="existence and a sample only")
    p.add_argument("--workers", type=int, default=0, help="processes decoding in parallel")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("preview", help="write N augmented samples as PNGs")
    _common(p)
    p.add_argument("--out", required=True)
    p.add_argument("-n", "--n", type=int, default=8)
    p.add_argument("--stream", choices=("labeled", "unlabeled"), default="labeled")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("prepare", help="generate synthetic data / convert Cityscapes labels")
    _common(p)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-val", type=int)
    p.add_argument("--seed", type=int, help="generation seed (synthetic, synthetic-v2, fashion)")
    p.add_argument("--source", help="fashion: folder of the Fashion-MNIST idx files (default "
                                    "$CPS_FAST_FASHION_MNIST, else /usr/share/datasets/fashion-mnist)")
    p.add_argument("--force", action="store_true", help="regenerate / overwrite")
    p.add_argument("--trainids", action="store_true",
                   help="cityscapes: write *_gtFine_labelTrainIds.png from labelIds")
    p.set_defaults(func=cmd_prepare)
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CpsFastError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
