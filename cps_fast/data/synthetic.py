"""The built-in synthetic segmentation dataset ("synthetic-v1").

Small textured scenes, generated on first use, deterministically from a seed, into a
PASCAL-VOC-like tree (``JPEGImages/*.jpg``, palette ``SegmentationClass/*.png``,
``ImageSets/Segmentation/{train,val}.txt``), so that it goes through exactly the same
reader as VOC.

Why it is built this way: the class of an object must need shape AND texture, so that a
network has to learn something, and labels matter:

- every object has random colours (colour says nothing about the class); each class has
  its own shape and its own texture family (disc + polka dots, square + checkerboard,
  triangle + stripes, ring + cross-hatch, blob + speckle) with random period and
  orientation;
- the background is cluttered: smooth random-colour noise, random lines, and distractors
  that share one cue with a class but not both (class shapes filled with background-like
  noise; thin bars carrying class textures) — those are labelled background;
- objects vary in size, overlap and occlude each other; global colour jitter and pixel
  noise, then JPEG compression;
- a 1-pixel ignore band (255) on object borders, as in VOC.

Generation writes each file atomically and the marker file ``COMPLETE.json`` last, so an
interrupted generation is simply redone, and concurrent ranks produce identical files.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import DataError
from .generated import atomic_save, atomic_text, check_target
from .info import DatasetInfo, voc_palette

SYNTHETIC_VERSION = 1   # the dataset's name (synthetic-v1)
# Bumped whenever the generator's output changes: a set from an older generator is then
# regenerated in place instead of silently mixing with, or standing in for, the new one.
GENERATOR_REVISION = 3
SYNTHETIC_CLASS_NAMES = ("background", "disc", "square", "triangle", "ring", "blob")
SYNTHETIC_NUM_CLASSES = len(SYNTHETIC_CLASS_NAMES)
MARKER = "COMPLETE.json"
DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_SEED = 1000, 100, 0
SIZE_RANGE = (96, 160)  # image height and width, drawn independently


def default_synthetic_root() -> str:
    """``$CPS_FAST_DATA_HOME/synthetic-v1``, else ``~/.cache/cps_fast/synthetic-v1``."""
    home = os.environ.get("CPS_FAST_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "cps_fast")
    return os.path.join(home, f"synthetic-v{SYNTHETIC_VERSION}")


def synthetic_info() -> DatasetInfo:
    return DatasetInfo("synthetic", SYNTHETIC_NUM_CLASSES, 255, SYNTHETIC_CLASS_NAMES,
                       voc_palette(SYNTHETIC_NUM_CLASSES), 0, None)


# --------------------------------------------------------------------------- drawing


def _rotated(x, y, angle):
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, -x * s + y * c


def _texture(kind: str, x, y, rng) -> np.ndarray:
    """Mixing weight in [0, 1] for texture ``kind`` at pixel coordinates (x, y).

    The families differ in spatial frequency as well as in pattern (big dots, fine checks,
    medium stripes, coarse hatching, pixel speckle), which a small network picks up much
    sooner than pattern alone; orientation and period are still random per object.
    """
    u, v = _rotated(x, y, rng.uniform(0, np.pi))
    if kind == "dots":
        p = rng.uniform(11, 14)
        du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
        return (du * du + dv * dv < (0.3 * p) ** 2).astype(np.float32)
    if kind == "checker":
        p = rng.uniform(3.5, 5)
        return (np.mod(np.floor(u / p) + np.floor(v / p), 2)).astype(np.float32)
    if kind == "stripes":
        p = rng.uniform(8, 11)
        return (np.mod(u, p) < p / 2).astype(np.float32)
    if kind == "hatch":
        p = rng.uniform(9, 13)
        return ((np.mod(u, p) < 0.3 * p) | (np.mod(v, p) < 0.3 * p)).astype(np.float32)
    if kind == "speckle":  # random 2x2-pixel cells
        h, w = x.shape
        cells = (rng.random(((h + 1) // 2, (w + 1) // 2)) < 0.5).astype(np.float32)
        return np.repeat(np.repeat(cells, 2, 0), 2, 1)[:h, :w]
    raise ValueError(kind)


def _smooth_noise(h: int, w: int, rng, cells: Optional[int] = None) -> np.ndarray:
    """Random colours on a coarse grid, upsampled bilinearly: cloudy background, h x w x 3."""
    n = cells or int(rng.integers(3, 8))
    coarse = rng.uniform(0, 255, size=(n, n, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _shape_mask(kind: str, dx, dy, r: float, rng) -> np.ndarray:
    """Boolean mask of shape ``kind`` of size ``r`` centred at (0, 0), randomly rotated."""
    angle = rng.uniform(0, 2 * np.pi)
    if kind == "disc":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        u, v = _rotated(dx, dy, angle)
        s = 0.8 * r
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if kind == "triangle":  # regular triangle: three half-planes at the inradius r / 2
        m = np.ones(dx.shape, dtype=bool)
        for k in range(3):
            a = angle + 2 * np.pi * k / 3
            m &= dx * np.cos(a) + dy * np.sin(a) <= 0.5 * r * 1.25
        return m
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "blob":
        phi = np.arctan2(dy, dx)
        k1, k2 = rng.uniform(0.1, 0.22, size=2)
        rad = r * (0.8 + k1 * np.sin(3 * phi + rng.uniform(0, 6.3)) + k2 * np.sin(5 * phi + angle))
        return dx * dx + dy * dy <= rad * rad
    if kind == "bar":
        u, v = _rotated(dx, dy, angle)
        return (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.1, 0.22))
    raise ValueError(kind)


# class index -> (shape, texture)
_CLASSES = {1: ("disc", "dots"), 2: ("square", "checker"), 3: ("triangle", "stripes"),
            4: ("ring", "hatch"), 5: ("blob", "speckle")}
_SHAPES = [s for s, _ in _CLASSES.values()]
_TEXTURES = [t for _, t in _CLASSES.values()]


def _paint(img, lab, rng, shape, r, cls, texture: Optional[str]):
    """Paint one object (texture=None: background-like noise) into img/lab in place."""
    h, w = lab.shape
    cy, cx = rng.uniform(0.05 * h, 0.95 * h), rng.uniform(0.05 * w, 0.95 * w)
    y0, y1 = max(0, int(cy - r) - 1), min(h, int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r) - 1), min(w, int(cx + r) + 2)
    if y1 <= y0 or x1 <= x0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    m = _shape_mask(shape, xx - cx, yy - cy, r, rng)
    if not m.any():
        return
    if texture is None:
        fill = _smooth_noise(y1 - y0, x1 - x0, rng, cells=int(rng.integers(2, 5)))
    else:
        c1, c2 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        if np.abs(c1 - c2).sum() < 200:  # keep the texture visible
            c2 = 255.0 - c1
        t = _texture(texture, xx, yy, rng)[..., None]
        fill = c1 * (1 - t) + c2 * t
    img[y0:y1, x0:x1][m] = fill[m]
    lab[y0:y1, x0:x1][m] = cls


def render_scene(rng: np.random.Generator) -> tuple:
    """One synthetic image (H x W x 3 uint8) and its label (H x W uint8)."""
    h, w = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    img = _smooth_noise(h, w, rng)
    lab = np.zeros((h, w), dtype=np.uint8)
    # Clutter: random straight lines in random colours.
    for _ in range(int(rng.integers(2, 6))):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a, off = rng.uniform(0, np.pi), rng.uniform(-max(h, w), max(h, w))
        d = np.abs(xx * np.cos(a) + yy * np.sin(a) - off)
        img[d < rng.uniform(0.7, 2.5)] = rng.uniform(0, 255, size=3)
    # Objects and distractors, painted in random order so that they occlude each other.
    items = [("obj", int(c)) for c in rng.integers(1, SYNTHETIC_NUM_CLASSES, size=int(rng.integers(2, 6)))]
    items += [("distractor", 0)] * int(rng.integers(0, 3))
    for j in rng.permutation(len(items)):
        kind, cls = items[j]
        r = rng.uniform(12, 0.4 * min(h, w))
        if kind == "obj":
            shape, tex = _CLASSES[cls]
            _paint(img, lab, rng, shape, r, cls, tex)
        elif rng.random() < 0.5:  # a class shape with background texture
            _paint(img, lab, rng, _SHAPES[int(rng.integers(len(_SHAPES)))], r, 0, None)
        else:  # a thin bar with a class texture
            _paint(img, lab, rng, "bar", r, 0, _TEXTURES[int(rng.integers(len(_TEXTURES)))])
    # Ignore band: pixels whose right or lower neighbour has another class.
    edge = np.zeros_like(lab, dtype=bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    lab[edge] = 255
    # Global colour jitter (contrast, brightness, per-channel gain) and pixel noise.
    img = img * rng.uniform(0.7, 1.2) + rng.uniform(-25, 25)
    img = img * rng.uniform(0.85, 1.15, size=3) + rng.normal(0, 4, size=img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), lab


# --------------------------------------------------------------------------- writing


def is_complete(root: str, n_train: Optional[int] = None, n_val: Optional[int] = None,
                seed: Optional[int] = None) -> bool:
    """True when ``root`` holds a finished generation of this version (with these counts and
    seed, where given; None accepts any, e.g. a small set a test or user made)."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("version") != SYNTHETIC_VERSION \
            or meta.get("revision") != GENERATOR_REVISION:
        return False
    want = {"n_train": n_train, "n_val": n_val, "seed": seed}
    return all(v is None or meta.get(k) == v for k, v in want.items())


def _meta(n_train, n_val, seed) -> dict:
    return {"version": SYNTHETIC_VERSION, "revision": GENERATOR_REVISION, "n_train": n_train,
            "n_val": n_val, "seed": seed}


def generate_synthetic(root: str, n_train: int = DEFAULT_TRAIN, n_val: int = DEFAULT_VAL,
                       seed: int = DEFAULT_SEED) -> str:
    """(Re)generate the dataset under ``root``; returns ``root``. Deterministic: image i of
    a side depends only on (seed, side, i)."""
    # Never over another generated set (synthetic-v2, fashion) or foreign files.
    check_target(root, "synthetic", {"JPEGImages", "SegmentationClass", "ImageSets", MARKER})
    try:
        os.makedirs(root, exist_ok=True)
        dirs = {k: os.path.join(root, k) for k in ("JPEGImages", "SegmentationClass")}
        sets = os.path.join(root, "ImageSets", "Segmentation")
        for d in (*dirs.values(), sets):
            os.makedirs(d, exist_ok=True)
        marker = os.path.join(root, MARKER)
        if os.path.exists(marker):
            os.remove(marker)
        palette = voc_palette(256).reshape(-1).tolist()
        for side_no, (side, n) in enumerate((("train", n_train), ("val", n_val))):
            ids = []
            for i in range(n):
                sid = f"{side}_{i:05d}"
                rng = np.random.default_rng(np.random.SeedSequence([seed, side_no, i]))
                img, lab = render_scene(rng)
                atomic_save(Image.fromarray(img), os.path.join(dirs["JPEGImages"], sid + ".jpg"),
                             format="JPEG", quality=90)
                # A palette PNG whose indices are the classes (as VOC's SegmentationClass).
                lab_img = Image.frombytes("P", (lab.shape[1], lab.shape[0]), lab.tobytes())
                lab_img.putpalette(palette)
                atomic_save(lab_img, os.path.join(dirs["SegmentationClass"], sid + ".png"),
                             format="PNG")
                ids.append(sid)
            atomic_text(os.path.join(sets, f"{side}.txt"), "\n".join(ids) + "\n")
        atomic_text(marker, json.dumps(_meta(n_train, n_val, seed)) + "\n")  # last
    except OSError as e:
        raise DataError(f"{root}: cannot write the synthetic dataset ({e.strerror or e})") from None
    return root


def ensure_synthetic(root: Optional[str] = None, n_train: Optional[int] = None,
                     n_val: Optional[int] = None, seed: Optional[int] = None,
                     verbose: bool = True) -> str:
    """Generate the synthetic dataset under ``root`` unless a complete one is there (with the
    given counts / seed; None = any finished set, else the defaults 1000 / 100 / 0)."""
    root = root or default_synthetic_root()
    if not is_complete(root, n_train, n_val, seed):
        n_train = DEFAULT_TRAIN if n_train is None else n_train
        n_val = DEFAULT_VAL if n_val is None else n_val
        seed = DEFAULT_SEED if seed is None else seed
        if verbose:
            print(f"cps_fast: generating the synthetic dataset ({n_train} train + {n_val} val "
                  f"images) in {root} ...", flush=True)
        generate_synthetic(root, n_train, n_val, seed)
    return root
