"""Fashion-MNIST mosaics ("fashion"): real photographs, exact masks.

Fashion-MNIST (Zalando, MIT licence) holds 70k greyscale 28x28 product photos in 10
classes, whose background pixels are exactly 0. Tiling items into mosaics gives multi-class
scenes whose masks are exact: a pixel belongs to its item's class where it is non-zero and
to class 0 "background" where it is zero. The mosaics are generated once into a VOC-layout
tree (``generated.py``), train from the package's train file and val from its test file,
and then read like any other dataset.

What the task is: per-item classification (10 product classes) plus figure/ground, at the
pixel level. What it is not: scene parsing -- the items never overlap or interact, the
background is empty, and context says nothing about a class.

A mosaic: an 84x84 canvas cut into a g x g grid, g in {2, 3}; each cell holds an item
with probability 0.85, scaled to a random 0.7-1.0 of the cell (bilinear: 20-42 pixels), at
a random place inside the cell. (A 112-pixel canvas with 4x4 grids taught the tiny network
less per step: a 64-pixel crop held fewer item pixels.) Interpolation leaves a faint halo around an item; pixels below 10
(of 255) are set to 0 after scaling, so "non-zero" still means "item" exactly.

The source files come from Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``)
or any folder named by ``$CPS_FAST_FASHION_MNIST`` (or ``prepare --source``), with the four
idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-...``),
gzipped or not.
"""

from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import DataError
from .generated import data_home, marker_matches, write_tree
from .info import DatasetInfo, voc_palette

VERSION = 1
REVISION = 1
ITEM_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                "sneaker", "bag", "ankle boot")
CLASS_NAMES = ("background",) + ITEM_CLASSES
NUM_CLASSES = len(CLASS_NAMES)
DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_SEED = 512, 500, 0
CANVAS = 84
GRIDS = (2, 3)
FILL_PROB = 0.85
SCALE_RANGE = (0.7, 1.0)
HALO = 10  # pixels below this after scaling are set to 0 (background)
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
ENV = "CPS_FAST_FASHION_MNIST"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def default_source() -> str:
    return os.environ.get(ENV) or DEBIAN_DIR


def default_root() -> str:
    return os.path.join(data_home(), f"fashion-mosaic-v{VERSION}")


def info() -> DatasetInfo:
    return DatasetInfo("fashion", NUM_CLASSES, 255, CLASS_NAMES, voc_palette(NUM_CLASSES), 0,
                       None)


# --------------------------------------------------------------------------- idx files


def _find(source: str, name: str) -> Optional[str]:
    for cand in (name, name + ".gz"):
        p = os.path.join(source, cand)
        if os.path.isfile(p):
            return p
    return None


def missing_message(source: str) -> str:
    return (f"fashion: no Fashion-MNIST idx files in {source} (install them with "
            f"`apt-get install dataset-fashion-mnist`, or set {ENV} to a folder holding "
            f"train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-"
            f"ubyte[.gz] and t10k-labels-idx1-ubyte[.gz])")


def read_idx(path: str) -> np.ndarray:
    """An idx file (big-endian header: 0, 0, type 0x08 = uint8, ndim; then the sizes)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read idx file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    n = int(np.prod(shape)) if shape else 0
    if len(raw) - head != n:
        raise DataError(f"{path}: idx header says {shape} ({n} bytes) but the file holds "
                        f"{len(raw) - head}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def load_items(source: str, part: str) -> tuple:
    """(images (N, 28, 28) uint8, labels (N,) uint8 in 0..9) of ``part`` train | test."""
    paths = [_find(source, name) for name in FILES[part]]
    if not os.path.isdir(source) or None in paths:
        raise DataError(missing_message(source))
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or len(images) == 0:
        raise DataError(f"{paths[0]}: {images.shape} images do not match {paths[1]}: "
                        f"{labels.shape} labels")
    if labels.max() >= len(ITEM_CLASSES):
        raise DataError(f"{paths[1]}: labels up to {int(labels.max())}, expected 0..9")
    return images, labels


# --------------------------------------------------------------------------- mosaics


def render_mosaic(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> tuple:
    """One mosaic: (image CANVAS x CANVAS x 3 uint8, label uint8, items), items being
    ``(index, class, y0, x0, size, cell)`` of each item placed (cell: the grid's cell size)."""
    img = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    lab = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    g = int(GRIDS[int(rng.integers(len(GRIDS)))])
    cell = CANVAS // g
    items = []
    for cy in range(g):
        for cx in range(g):
            if rng.random() >= FILL_PROB:
                continue
            idx = int(rng.integers(len(images)))
            size = max(8, int(round(cell * rng.uniform(*SCALE_RANGE))))
            y0 = cy * cell + int(rng.integers(0, cell - size + 1))
            x0 = cx * cell + int(rng.integers(0, cell - size + 1))
            item = np.asarray(Image.fromarray(images[idx]).resize((size, size), Image.BILINEAR))
            item = np.where(item < HALO, 0, item).astype(np.uint8)
            cls = int(labels[idx]) + 1
            img[y0:y0 + size, x0:x0 + size] = item
            lab[y0:y0 + size, x0:x0 + size] = np.where(item > 0, cls, 0)
            items.append((idx, cls, y0, x0, size, cell))
    return np.repeat(img[..., None], 3, axis=2), lab, items


def _meta(n_train, n_val, seed, source) -> dict:
    return {"dataset": "fashion", "version": VERSION, "revision": REVISION,
            "n_train": n_train, "n_val": n_val, "seed": seed, "source": source}


def is_complete(root: str, n_train: Optional[int] = None, n_val: Optional[int] = None,
                seed: Optional[int] = None) -> bool:
    return marker_matches(root, _meta(n_train, n_val, seed, None))


def generate(root: str, source: Optional[str] = None, n_train: int = DEFAULT_TRAIN,
             n_val: int = DEFAULT_VAL, seed: int = DEFAULT_SEED) -> str:
    """(Re)generate the mosaics under ``root`` from the idx files in ``source``."""
    source = source or default_source()
    parts = {"train": load_items(source, "train"), "val": load_items(source, "test")}

    def side(name, side_no):
        images, labels = parts[name]
        return lambda i: render_mosaic(
            np.random.default_rng(np.random.SeedSequence([seed, 0xFA5, side_no, i])),
            images, labels)[:2]

    return write_tree(root, _meta(n_train, n_val, seed, os.path.abspath(source)),
                      {"train": (n_train, side("train", 0)), "val": (n_val, side("val", 1))})


def ensure(root: Optional[str] = None, n_train: Optional[int] = None,
           n_val: Optional[int] = None, seed: Optional[int] = None,
           source: Optional[str] = None, verbose: bool = True) -> str:
    """Generate the mosaics under ``root`` unless a complete set is there."""
    root = root or default_root()
    if not is_complete(root, n_train, n_val, seed):
        n_train = DEFAULT_TRAIN if n_train is None else n_train
        n_val = DEFAULT_VAL if n_val is None else n_val
        seed = DEFAULT_SEED if seed is None else seed
        source = source or default_source()
        if verbose:
            print(f"cps_fast: generating Fashion-MNIST mosaics ({n_train} train + {n_val} val) "
                  f"from {source} in {root} ...", flush=True)
        generate(root, source, n_train, n_val, seed)
    return root
