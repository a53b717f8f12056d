"""Dataset indexes and labeled / unlabeled / validation splits.

``build_splits(cfg)`` finds the dataset tree under ``cfg.root`` (PASCAL VOC official or CPS
layout, Cityscapes official or CPS layout, or the built-in synthetic set), indexes its files
once with a directory scan (so that checking 10k list entries is a set lookup, not 10k
``stat`` calls), and resolves the split lists against that index. Lists (splits.py) may
name bare ids (``2007_000032``), ``image<TAB>label`` paths (CPS) or ``image label`` paths
(UniMatch); all resolve through the id, so the official CPS Cityscapes lists
(``/images/train/x.png ...``) also work on the official ``leftImg8bit/`` tree.

``data.labeled_pool=fine`` is VOC's few-label protocol: the labeled images are drawn from
(or listed among) the 1464 finely annotated images of ``ImageSets/Segmentation/train.txt``,
and the unlabeled split is the rest of the train list (train_aug).

Every problem raises ``DataError`` naming the file or option, unless ``strict=False``, in
which case problems are collected in ``Splits.problems`` (``python -m cps_fast.data check``
reports them all at once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .cityscapes_labels import (CITYSCAPES_CLASS_NAMES, CITYSCAPES_NUM_CLASSES,
                                CITYSCAPES_PALETTE, labelid_to_trainid_lut)
from . import fashion, synthetic, synthetic_v2
from .info import DatasetInfo, voc_palette  # noqa: F401  (re-exported)
# Split lists and partitions live in splits.py; re-exported here for existing imports.
from .splits import (ListEntry, find_split_files, id_from_path, labeled_count,  # noqa: F401
                     make_partition, read_list, split_tag, write_list)

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Sample:
    """One image and (when known) its label map, as absolute paths."""
    id: str
    image: str
    label: Optional[str]


@dataclass
class Splits:
    labeled: list
    unlabeled: list
    val: list
    info: DatasetInfo
    problems: list = field(default_factory=list)  # only filled when built with strict=False
    sources: dict = field(default_factory=dict)   # where each split came from, for logs


# --------------------------------------------------------------------------- dataset facts

VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)


def voc_info() -> DatasetInfo:
    return DatasetInfo("voc", 21, 255, VOC_CLASS_NAMES, voc_palette(21), 0, None)


def cityscapes_info(use_labelids: bool) -> DatasetInfo:
    lut = labelid_to_trainid_lut(255) if use_labelids else None
    return DatasetInfo("cityscapes", CITYSCAPES_NUM_CLASSES, 255, CITYSCAPES_CLASS_NAMES,
                       CITYSCAPES_PALETTE.copy(), None, lut)


# Datasets cps_fast generates itself on first use (in a VOC layout), by name:
# (info(), default_root(), ensure(root) -> root).
GENERATED = {
    "synthetic": (synthetic.synthetic_info, synthetic.default_synthetic_root,
                  lambda root: synthetic.ensure_synthetic(root)),
    "synthetic-v2": (synthetic_v2.info, synthetic_v2.default_root,
                     lambda root: synthetic_v2.ensure(root)),
    "fashion": (fashion.info, fashion.default_root, lambda root: fashion.ensure(root)),
}


def dataset_info(name: str) -> DatasetInfo:
    """The label facts of a dataset by name (Cityscapes: its trainIds)."""
    if name in GENERATED:
        return GENERATED[name][0]()
    return voc_info() if name == "voc" else cityscapes_info(False)


def dataset_num_classes(name: str) -> int:
    return dataset_info(name).num_classes


# --------------------------------------------------------------------------- problems


class _Problems:
    """Raise at the first problem (strict) or collect them all (for ``check``)."""

    def __init__(self, strict: bool):
        self.strict, self.items = strict, []

    def report(self, msg: str) -> None:
        if self.strict:
            raise DataError(msg)
        self.items.append(msg)


def _preview(ids: list, n: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:n])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > n else f" ({len(ids)} in all)")


# --------------------------------------------------------------------------- layouts


@dataclass
class _Layout:
    """A scanned dataset tree: id -> Sample for the train and val sides, default lists."""
    root: str
    kind: str
    train: dict
    val: dict
    train_ids: list
    val_ids: list
    info: DatasetInfo
    train_src: str = ""
    val_src: str = ""
    fine_ids: Optional[list] = None   # VOC's 1464 finely annotated train ids, when listed
    fine_src: str = ""


def _scan(dirpath: str, suffix: str) -> dict:
    """{name_without_suffix: absolute path} for the files in ``dirpath`` ending in ``suffix``."""
    out = {}
    with os.scandir(dirpath) as it:
        for e in it:
            if e.name.endswith(suffix) and e.is_file():
                out[e.name[: -len(suffix)]] = os.path.abspath(e.path)
    return out


def _need_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DataError(f"{path}: {what} directory not found")
    return path


def _voc_layout(root: str, info: DatasetInfo) -> _Layout:
    for base in (os.path.join(root, "VOCdevkit", "VOC2012"), os.path.join(root, "VOC2012"), root):
        if os.path.isdir(os.path.join(base, "JPEGImages")):
            return _voc_official(base, info)
    for train_name in ("train_aug", "train"):
        if os.path.isdir(os.path.join(root, train_name, "image")):
            return _voc_cps(root, train_name, info)
    raise DataError(f"{root}: no PASCAL VOC tree found (expected VOCdevkit/VOC2012/JPEGImages + "
                    "SegmentationClassAug, or the CPS layout train_aug/image + train_aug/label)")


def _voc_official(base: str, info: DatasetInfo) -> _Layout:
    images = _scan(os.path.join(base, "JPEGImages"), ".jpg")
    label_dir = os.path.join(base, "SegmentationClassAug")
    aug = os.path.isdir(label_dir)
    if not aug:
        label_dir = _need_dir(os.path.join(base, "SegmentationClass"),
                              "label (SegmentationClassAug or SegmentationClass)")
    labels = _scan(label_dir, ".png")
    index = {i: Sample(i, p, labels.get(i)) for i, p in images.items()}
    sets = os.path.join(base, "ImageSets", "Segmentation")
    val_file = os.path.join(sets, "val.txt")
    if not os.path.isfile(val_file):
        raise DataError(f"{val_file}: validation list not found")
    val_ids = [e.id for e in read_list(val_file)]
    train_file = os.path.join(sets, "train_aug.txt")
    if os.path.isfile(train_file):
        train_ids, train_src = [e.id for e in read_list(train_file)], train_file
    elif aug:
        # No train_aug.txt: the usual definition is every SBD-augmented label minus val.
        vs = set(val_ids)
        train_ids = sorted(i for i in labels if i not in vs)
        train_src = f"{label_dir} minus {val_file}"
    else:
        train_file = os.path.join(sets, "train.txt")
        if not os.path.isfile(train_file):
            raise DataError(f"{sets}: neither train_aug.txt nor train.txt found")
        train_ids, train_src = [e.id for e in read_list(train_file)], train_file
    fine_file = os.path.join(sets, "train.txt")  # the fine (non-SBD) annotations' train list
    fine = [e.id for e in read_list(fine_file)] if os.path.isfile(fine_file) else None
    return _Layout(base, "voc-official", index, index, train_ids, val_ids, info, train_src,
                   val_file, fine, fine_file if fine is not None else "")


def _voc_cps(root: str, train_name: str, info: DatasetInfo) -> _Layout:
    sides = {}
    for side in (train_name, "val"):
        img_dir = _need_dir(os.path.join(root, side, "image"), "image")
        lab_dir = _need_dir(os.path.join(root, side, "label"), "label")
        # JPEG (the release) or lossless PNG images (the sets cps_fast generates).
        images, labels = {**_scan(img_dir, ".png"), **_scan(img_dir, ".jpg")}, _scan(lab_dir, ".png")
        index = {i: Sample(i, p, labels.get(i)) for i, p in images.items()}
        lst = os.path.join(root, f"{side}.txt")
        if os.path.isfile(lst):
            ids, src = [e.id for e in read_list(lst)], lst
        else:
            ids, src = sorted(index), img_dir
        sides[side] = (index, ids, src)
    (ti, tids, tsrc), (vi, vids, vsrc) = sides[train_name], sides["val"]
    # The CPS release keeps the 1464 fine ids in train.txt beside train_aug.txt.
    fine_file = os.path.join(root, "train.txt")
    fine = ([e.id for e in read_list(fine_file)]
            if train_name == "train_aug" and os.path.isfile(fine_file) else None)
    return _Layout(root, "voc-cps", ti, vi, tids, vids, info, tsrc, vsrc, fine,
                   fine_file if fine is not None else "")


def _cityscapes_layout(root: str) -> _Layout:
    if os.path.isdir(os.path.join(root, "leftImg8bit")):
        return _cityscapes_official(root)
    if os.path.isdir(os.path.join(root, "images")):
        return _cityscapes_cps(root)
    raise DataError(f"{root}: no Cityscapes tree found (expected leftImg8bit/ + gtFine/, or "
                    "the CPS layout images/ + segmentation/)")


def _cityscapes_official(root: str) -> _Layout:
    per_side = {}
    for side in ("train", "val"):
        img_root = _need_dir(os.path.join(root, "leftImg8bit", side), "image")
        gt_root = _need_dir(os.path.join(root, "gtFine", side), "label")
        images, train_ids_lab, label_ids_lab = {}, {}, {}
        for city in sorted(os.listdir(img_root)):
            d = os.path.join(img_root, city)
            if os.path.isdir(d):
                images.update(_scan(d, "_leftImg8bit.png"))
        for city in sorted(os.listdir(gt_root)):
            d = os.path.join(gt_root, city)
            if os.path.isdir(d):
                train_ids_lab.update(_scan(d, "_gtFine_labelTrainIds.png"))
                label_ids_lab.update(_scan(d, "_gtFine_labelIds.png"))
        per_side[side] = (images, train_ids_lab, label_ids_lab)
    # One label encoding for the whole dataset (the LUT lives in DatasetInfo): trainIds when
    # every image has them, otherwise labelIds mapped through the standard LUT.
    all_ids = [(i, s) for s in per_side for i in per_side[s][0]]
    use_train_ids = all(i in per_side[s][1] for i, s in all_ids) and bool(all_ids)
    info = cityscapes_info(use_labelids=not use_train_ids)
    idx = {}
    for side, (images, tr, li) in per_side.items():
        labs = tr if use_train_ids else li
        idx[side] = {i: Sample(i, p, labs.get(i)) for i, p in images.items()}
    return _Layout(root, "cityscapes-official", idx["train"], idx["val"], sorted(idx["train"]),
                   sorted(idx["val"]), info, os.path.join(root, "leftImg8bit", "train"),
                   os.path.join(root, "leftImg8bit", "val"))


def _cityscapes_cps(root: str) -> _Layout:
    idx = {}
    for side in ("train", "val"):
        images = _scan(_need_dir(os.path.join(root, "images", side), "image"), ".png")
        labels = _scan(_need_dir(os.path.join(root, "segmentation", side), "label"), "_gtFine.png")
        idx[side] = {id_from_path(n): Sample(id_from_path(n), p, labels.get(id_from_path(n)))
                     for n, p in images.items()}
    # The CPS tree's *_gtFine.png files are trainIds already.
    return _Layout(root, "cityscapes-cps", idx["train"], idx["val"], sorted(idx["train"]),
                   sorted(idx["val"]), cityscapes_info(use_labelids=False),
                   os.path.join(root, "images", "train"), os.path.join(root, "images", "val"))


# --------------------------------------------------------------------------- resolving lists


def _resolve(entries: Iterable, index: dict, root: str, list_name: str, need_labels: bool,
             problems: _Problems) -> list:
    """Turn list entries into Samples; report unknown ids, missing labels and duplicates."""
    samples, missing, unlabeled, seen, dups = [], [], [], set(), []
    for e in entries:
        s = index.get(e.id)
        if s is None and e.image is not None:
            # Not in the scanned tree: accept the list's own paths when the files exist.
            img = os.path.join(root, e.image.lstrip("/\\"))
            lab = os.path.join(root, e.label.lstrip("/\\")) if e.label else None
            if os.path.isfile(img):
                s = Sample(e.id, os.path.abspath(img),
                           os.path.abspath(lab) if lab and os.path.isfile(lab) else None)
        if s is None:
            missing.append(e.id)
            continue
        if s.id in seen:
            dups.append(s.id)
            continue
        seen.add(s.id)
        if need_labels and s.label is None:
            unlabeled.append(s.id)
            continue
        samples.append(s)
    if missing:
        problems.report(f"{list_name}: names ids whose image files do not exist under {root}: "
                        f"{_preview(missing)}")
    if unlabeled:
        problems.report(f"{list_name}: ids without a label file: {_preview(unlabeled)}")
    if dups:
        problems.report(f"{list_name}: ids listed more than once: {_preview(dups)}")
    if not samples and not missing and not unlabeled:
        problems.report(f"{list_name}: split is empty")
    return samples


def default_root(dataset: str) -> Optional[str]:
    """Where a generated dataset lives unless data.root says otherwise (None: not generated)."""
    return GENERATED[dataset][1]() if dataset in GENERATED else None


def build_splits(cfg: DataConfig, strict: bool = True) -> Splits:
    """Index the dataset named by ``cfg`` and return its labeled / unlabeled / val samples.

    Raises DataError (missing root, dirs, list files, unknown ids, empty lists, labeled ids
    without labels, overlap of labeled and unlabeled) or ConfigError (``data.num_classes``
    not the dataset's). With ``strict=False`` list problems are collected in
    ``Splits.problems`` instead (a missing root or layout still raises).
    """
    expected = dataset_num_classes(cfg.dataset)
    if cfg.num_classes != expected:
        raise ConfigError(f"data.num_classes: {cfg.num_classes}, but dataset {cfg.dataset} has "
                          f"{expected} classes")
    if cfg.ignore_index != 255:
        raise ConfigError(f"data.ignore_index: {cfg.ignore_index}, but {cfg.dataset} label files "
                          "mark ignored pixels with 255")
    root = cfg.root
    if cfg.dataset in GENERATED:
        info_fn, root_fn, ensure = GENERATED[cfg.dataset]
        root = ensure(root or root_fn())
        layout = _voc_layout(root, info_fn())
    else:
        if not root:
            raise DataError(f"data.root: not set (the {cfg.dataset} dataset needs --data-root DIR)")
        if not os.path.isdir(root):
            raise DataError(f"data.root: {root} does not exist or is not a directory")
        layout = _voc_layout(root, voc_info()) if cfg.dataset == "voc" else _cityscapes_layout(root)

    problems = _Problems(strict)
    root_abs = os.path.abspath(layout.root)

    # ---- labeled / unlabeled
    fine = cfg.labeled_pool == "fine"
    if fine and cfg.dataset != "voc":
        raise ConfigError(f"data.labeled_pool: fine is VOC's few-label protocol; the "
                          f"{cfg.dataset} dataset has no such subset")
    if fine and layout.fine_ids is None:
        raise DataError(f"{layout.root}: data.labeled_pool=fine needs the list of the 1464 "
                        "finely annotated images (ImageSets/Segmentation/train.txt, or "
                        "train.txt beside the CPS train_aug/ folder)")
    pool_ids = layout.fine_ids if fine else layout.train_ids
    pool_src = layout.fine_src if fine else layout.train_src
    unl_entries, unl_src = None, None
    if cfg.labeled_list or cfg.unlabeled_list:
        if not cfg.labeled_list:
            raise ConfigError("data.labeled_list: needed when data.unlabeled_list is given")
        lab_src = cfg.labeled_list
        lab_entries = read_list(lab_src)
        if cfg.unlabeled_list:
            unl_src = cfg.unlabeled_list
            unl_entries = read_list(unl_src)
    elif cfg.split_dir:
        lab_src, unl_file = find_split_files(cfg.split_dir, cfg.split, cfg.labeled_pool,
                                             len(pool_ids) if pool_ids else None, cfg.dataset)
        lab_entries = read_list(lab_src)
        # The few-label protocol's unlabeled split is the rest of train_aug, whatever list
        # sits beside the labeled one: the CPS release's pseudoseg_unlabeled_1-N.txt hold the
        # rest of the 1464 only (one id repeated from the labeled list), and the CPS authors
        # trained on all of train_aug instead (TorchSemiSeg issue #22).
        if unl_file and not fine:
            unl_src, unl_entries = unl_file, read_list(unl_file)
    else:
        if not pool_ids:
            raise DataError(f"{pool_src}: the list the labeled images are drawn from is empty")
        lab_ids, _ = make_partition(pool_ids, cfg.split, cfg.split_seed)
        lab_src = f"partition {cfg.split} (seed {cfg.split_seed}) of {pool_src}"
        lab_entries = [ListEntry(i) for i in lab_ids]
        unl_src = f"rest of {layout.train_src}"
    if unl_entries is None:  # unlabeled = the rest of the train list
        lab_ids = {e.id for e in lab_entries}
        unl_src = unl_src or f"{layout.train_src} minus {lab_src}"
        unl_entries = [ListEntry(i) for i in layout.train_ids if i not in lab_ids]
    if fine:
        fine_set = set(layout.fine_ids)
        outside = [e.id for e in lab_entries if e.id not in fine_set]
        if outside:
            problems.report(f"{lab_src}: labeled ids that are not among the finely annotated "
                            f"images of {layout.fine_src} (data.labeled_pool=fine): "
                            f"{_preview(outside)}")

    labeled = _resolve(lab_entries, layout.train, root_abs, lab_src, True, problems)
    unlabeled = _resolve(unl_entries, layout.train, root_abs, unl_src, False, problems) \
        if unl_entries else []
    both = {s.id for s in labeled} & {s.id for s in unlabeled}
    if both:
        problems.report(f"{unl_src}: ids also in the labeled list {lab_src}: "
                        f"{_preview(sorted(both))}")

    # ---- validation
    if cfg.val_list:
        val_src, val_entries = cfg.val_list, read_list(cfg.val_list)
    else:
        val_src, val_entries = layout.val_src, [ListEntry(i) for i in layout.val_ids]
        if not val_entries:
            problems.report(f"{val_src}: no validation images")
    val = _resolve(val_entries, layout.val, root_abs, val_src, True, problems) if val_entries else []

    return Splits(labeled, unlabeled, val, layout.info, problems.items,
                  {"root": root_abs, "layout": layout.kind, "labeled": lab_src,
                   "unlabeled": unl_src, "val": val_src, "labeled_pool": cfg.labeled_pool})


__all__ = [
    "Sample", "DatasetInfo", "Splits", "build_splits", "voc_info", "cityscapes_info",
    "voc_palette", "VOC_CLASS_NAMES", "dataset_info", "GENERATED",
]
