"""Tiny fake dataset trees for the data tests (built in tmp_path, a few KB each)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from cps_fast.data.datasets import voc_palette

# The split lists published with the CPS code (TorchSemiSeg: DATA/pascal_voc/subset_train_aug,
# DATA/city/config_new), laid out as pascal_voc/subset_train_aug/ and city/config_new/ under
# one folder, are optional test data outside the repository: the tests that read them find
# the folder through this variable (.ci/run sets it) and skip cleanly without it.
OFFICIAL_SPLITS_ENV = "CPS_FAST_OFFICIAL_SPLITS"
OFFICIAL_SPLITS = os.environ.get(OFFICIAL_SPLITS_ENV, "")


def tree_bytes(root) -> dict:
    """Every file under ``root``: relative path -> its bytes (to compare generated trees)."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def rand_image(rng, h, w) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def rand_label(rng, h, w, num_classes, ignore=True) -> np.ndarray:
    lab = rng.integers(0, num_classes, size=(h, w)).astype(np.uint8)
    if ignore:
        lab[0, :3] = 255
    return lab


def save_image(path, arr, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def save_label(path, arr, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if palette:
        im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
        im.putpalette(voc_palette(256).reshape(-1).tolist())
    else:
        im = Image.fromarray(arr)
    im.save(path, format="PNG")


def write_lines(path, lines, newline="\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(newline.join(lines) + newline)


def voc_ids(n, prefix="2007"):
    return [f"{prefix}_{i:06d}" for i in range(n)]


def make_voc(root, n_train=16, n_val=4, aug=True, train_list=True, palette=False, seed=0,
             size=(20, 28), n_fine=0):
    """VOCdevkit/VOC2012 with JPEGImages, SegmentationClass[Aug], ImageSets/Segmentation.
    ``n_fine``: also train.txt, the list of the finely annotated images (as VOC's 1464),
    every other train id from the first on."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    train, val = voc_ids(n_train, "2007"), voc_ids(n_val, "2008")
    lab_dir = "SegmentationClassAug" if aug else "SegmentationClass"
    for i in train + val:
        save_image(os.path.join(base, "JPEGImages", i + ".jpg"), rand_image(rng, *size))
        save_label(os.path.join(base, lab_dir, i + ".png"), rand_label(rng, *size, 21), palette)
    sets = os.path.join(base, "ImageSets", "Segmentation")
    write_lines(os.path.join(sets, "val.txt"), val)
    if train_list:
        write_lines(os.path.join(sets, "train_aug.txt" if aug else "train.txt"), train)
    else:
        os.makedirs(sets, exist_ok=True)
    if n_fine:
        write_lines(os.path.join(sets, "train.txt"), fine_ids(train, n_fine))
    return base, train, val


def fine_ids(train, n_fine):
    """The fine subset make_voc/make_voc_index write: every other train id, then the rest."""
    order = train[::2] + train[1::2]
    return sorted(order[:n_fine])


def make_voc_index(root, n_train, n_fine, n_val=4):
    """A VOC tree of empty image and label files, for what only indexes files (split
    resolution): thousands of ids in well under a second. Returns (base, train, fine, val)."""
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    train, val = voc_ids(n_train, "2007"), voc_ids(n_val, "2008")
    for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClassAug", ".png")):
        d = os.path.join(base, sub)
        os.makedirs(d, exist_ok=True)
        for i in train + val:
            open(os.path.join(d, i + ext), "wb").close()
    sets = os.path.join(base, "ImageSets", "Segmentation")
    fine = fine_ids(train, n_fine)
    write_lines(os.path.join(sets, "train_aug.txt"), train)
    write_lines(os.path.join(sets, "train.txt"), fine)
    write_lines(os.path.join(sets, "val.txt"), val)
    return base, train, fine, val


def make_voc_cps(root, n_train=16, n_val=4, seed=0, size=(20, 28)):
    """The CPS layout: train_aug/{image,label}, val/{image,label}."""
    rng = np.random.default_rng(seed)
    train, val = voc_ids(n_train, "2007"), voc_ids(n_val, "2008")
    for side, ids in (("train_aug", train), ("val", val)):
        for i in ids:
            save_image(os.path.join(root, side, "image", i + ".jpg"), rand_image(rng, *size))
            save_label(os.path.join(root, side, "label", i + ".png"), rand_label(rng, *size, 21))
    return train, val


CITY_IDS = {"train": ["jena_000000_000019", "jena_000001_000019", "aachen_000000_000019",
                      "aachen_000001_000019", "bremen_000000_000019", "bremen_000001_000019",
                      "bremen_000002_000019", "bremen_000003_000019"],
            "val": ["frankfurt_000000_000001", "frankfurt_000000_000002"]}


def make_cityscapes(root, train_ids=False, label_ids=True, seed=0, size=(16, 32)):
    """Official tree: leftImg8bit/{train,val}/<city>/..., gtFine/... labelIds and/or trainIds.
    The labelIds hold raw Cityscapes ids (0..33); returns {id: expected trainId array}."""
    from cps_fast.data.cityscapes_labels import labelid_to_trainid_lut

    rng = np.random.default_rng(seed)
    lut = labelid_to_trainid_lut()
    expected = {}
    for side, ids in CITY_IDS.items():
        for i in ids:
            city = i.split("_")[0]
            save_image(os.path.join(root, "leftImg8bit", side, city, f"{i}_leftImg8bit.png"),
                       rand_image(rng, *size))
            raw = rng.integers(0, 34, size=size).astype(np.uint8)
            expected[i] = lut[raw]
            gt = os.path.join(root, "gtFine", side, city)
            if label_ids:
                save_label(os.path.join(gt, f"{i}_gtFine_labelIds.png"), raw)
            if train_ids:
                save_label(os.path.join(gt, f"{i}_gtFine_labelTrainIds.png"), lut[raw])
    return expected


def make_cityscapes_cps(root, seed=0, size=(16, 32)):
    """CPS tree: images/{train,val}/<id>.png, segmentation/{train,val}/<id>_gtFine.png
    (trainIds), and config_new lists with the official quirks (leading '/', TAB, CRLF)."""
    rng = np.random.default_rng(seed)
    for side, ids in CITY_IDS.items():
        lines = []
        for i in ids:
            save_image(os.path.join(root, "images", side, f"{i}.png"), rand_image(rng, *size))
            save_label(os.path.join(root, "segmentation", side, f"{i}_gtFine.png"),
                       rand_label(rng, *size, 19))
            lines.append(f"/images/{side}/{i}.png\t/segmentation/{side}/{i}_gtFine.png  ")
        write_lines(os.path.join(root, "config_new", f"{side}.txt"), lines, "\r\n")


def class_colour_image(rng, h, w, colours):
    """A label of random rectangles over K classes, and an image whose every pixel is its
    class's flat colour (so the class can be read back from the colour)."""
    k = len(colours)
    lab = np.zeros((h, w), np.uint8)
    for _ in range(12):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        y1, x1 = y0 + rng.integers(4, h // 2), x0 + rng.integers(4, w // 2)
        lab[y0:y1, x0:x1] = rng.integers(0, k)
    img = np.asarray(colours, np.uint8)[lab]
    return img, lab
