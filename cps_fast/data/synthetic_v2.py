"""The built-in synthetic segmentation dataset, version 2 ("synthetic-v2").

Built so that unlabeled images matter (issue 16). v1 needed shape AND texture under heavy
clutter and JPEG noise; even all 1000 labels gave ~40 mIoU, so labels were not what limited
it. v2 keeps the cues local, so that a small network learns them fast, and makes each
class's *appearance variety* the thing a few labels do not cover:

- every foreground class has its own texture family (dots, checks, stripes, cross-hatch,
  speckle), drawn at one of three periods, at a random orientation;
- and its own set of colour palettes (``palettes`` colour pairs per class, disjoint
  between classes, fixed by the ``world`` seed): an object's appearance mode is
  (period, palette), so a class has 3 x ``palettes`` modes;
- an image shows 1-4 objects (random blobs: the shape says nothing about the class), i.e.
  a few modes. 1/16 of a 512-image pool holds ~20 objects per class and misses about half
  of the palettes; the unlabeled images hold them. Colour is the easy cue for a palette a
  network has seen; for one it has not, only the texture family still says the class --
  which is what pseudo-labels on unlabeled images can carry over;
- the background is a smooth random-colour field without texture; a 1-pixel ignore band
  (255) on object borders, as in VOC; mild global colour jitter and pixel noise;
- lossless PNG images, in the CPS release layout of VOC (see ``generated.py``).

Deterministic: image i of a side depends only on (seed, side, i) and the world (the class
definitions) only on ``world``. A different ``world`` gives a different task with the
same class names (other palettes; ``textures="alt"`` also swaps in disjoint texture
families), for pre-training on a task that is not the benchmark's.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from PIL import Image

from .generated import data_home, marker_matches, write_tree
from .info import DatasetInfo, voc_palette

VERSION = 2
# Bumped whenever the generator's output changes: an older set is regenerated in place.
REVISION = 1
CLASS_NAMES = ("background", "dots", "checks", "stripes", "hatch", "speckle")
NUM_CLASSES = len(CLASS_NAMES)
DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_SEED = 512, 500, 0
SIZE_RANGE = (72, 104)  # image height and width, drawn independently

# Texture family per foreground class, and its three periods (pixels). The "alt" families
# (disjoint from these) make a different task for pre-training.
FAMILIES = {"main": ("dots", "checks", "stripes", "hatch", "speckle"),
            "alt": ("rings", "waves", "zigzag", "grid_dots", "bricks")}
PERIODS = {"dots": (6.0, 9.0, 12.0), "checks": (3.0, 5.0, 7.0), "stripes": (4.0, 6.0, 9.0),
           "hatch": (6.0, 9.0, 12.0), "speckle": (1.0, 2.0, 3.0),
           "rings": (6.0, 9.0, 12.0), "waves": (6.0, 9.0, 12.0), "zigzag": (5.0, 8.0, 11.0),
           "grid_dots": (5.0, 7.0, 10.0), "bricks": (6.0, 9.0, 12.0)}


@dataclass(frozen=True)
class Spec:
    """The knobs of the generator (recorded in the marker; a set is reused only if equal)."""
    palettes: int = 6           # colour pairs per class
    world: int = 0              # seed of the class definitions (palettes)
    textures: str = "main"      # "main" or "alt" texture families
    min_objects: int = 1
    max_objects: int = 4
    radius: tuple = (12.0, 26.0)

    def __post_init__(self):
        object.__setattr__(self, "radius", tuple(float(r) for r in self.radius))
        if self.textures not in FAMILIES:
            raise ValueError(f"textures: {self.textures!r} (main, alt)")


def default_root(spec: Spec = Spec()) -> str:
    """``$CPS_FAST_DATA_HOME/synthetic-v2`` (the default spec), else a folder naming the spec."""
    name = f"synthetic-v{VERSION}"
    if spec != Spec():
        name += f"-p{spec.palettes}-w{spec.world}-{spec.textures}"
    return os.path.join(data_home(), name)


def info() -> DatasetInfo:
    return DatasetInfo("synthetic-v2", NUM_CLASSES, 255, CLASS_NAMES, voc_palette(NUM_CLASSES),
                       0, None)


# --------------------------------------------------------------------------- the world


def _palette_pair(rng: np.random.Generator) -> np.ndarray:
    """Two colours far enough apart that the texture between them is visible."""
    while True:
        c = rng.uniform(20, 235, size=(2, 3))
        if np.abs(c[0] - c[1]).sum() >= 180:
            return c.astype(np.float32)


def world_palettes(spec: Spec) -> np.ndarray:
    """(NUM_CLASSES - 1, palettes, 2, 3) float32: each class's colour pairs."""
    rng = np.random.default_rng(np.random.SeedSequence([0xC0105, spec.world]))
    return np.stack([np.stack([_palette_pair(rng) for _ in range(spec.palettes)])
                     for _ in range(NUM_CLASSES - 1)])


# --------------------------------------------------------------------------- drawing


def _rotated(x, y, angle):
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, -x * s + y * c


def texture(kind: str, period: float, x: np.ndarray, y: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Mixing weight in [0, 1] of texture ``kind`` at pixel coordinates (x, y)."""
    u, v = _rotated(x, y, rng.uniform(0, np.pi))
    u, v = u + rng.uniform(0, period), v + rng.uniform(0, period)  # random phase
    p = period
    if kind == "dots":
        du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
        return (du * du + dv * dv < (0.3 * p) ** 2).astype(np.float32)
    if kind == "checks":
        return np.mod(np.floor(u / p) + np.floor(v / p), 2).astype(np.float32)
    if kind == "stripes":
        return (np.mod(u, p) < p / 2).astype(np.float32)
    if kind == "hatch":
        return ((np.mod(u, p) < 0.3 * p) | (np.mod(v, p) < 0.3 * p)).astype(np.float32)
    if kind == "speckle":  # random p x p cells
        h, w = x.shape
        cells = (rng.random((h // int(p) + 1, w // int(p) + 1)) < 0.5).astype(np.float32)
        return np.repeat(np.repeat(cells, int(p), 0), int(p), 1)[:h, :w]
    if kind == "rings":
        cx, cy = rng.uniform(-20, 20, size=2)
        return (np.mod(np.hypot(x - x.mean() - cx, y - y.mean() - cy), p) < p / 2).astype(np.float32)
    if kind == "waves":
        return (np.mod(u + 0.3 * p * np.sin(2 * np.pi * v / (2 * p)), p) < p / 2).astype(np.float32)
    if kind == "zigzag":
        return (np.mod(u + np.abs(np.mod(v, p) - p / 2), p) < p / 2).astype(np.float32)
    if kind == "grid_dots":
        du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
        return ((np.abs(du) < 0.2 * p) & (np.abs(dv) < 0.2 * p)).astype(np.float32)
    if kind == "bricks":
        row = np.floor(v / (p / 2))
        uu = u + np.mod(row, 2) * p / 2
        return ((np.mod(v, p / 2) < 0.15 * p) | (np.mod(uu, p) < 0.15 * p)).astype(np.float32)
    raise ValueError(kind)


def _smooth_noise(h: int, w: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Random colours on a coarse grid, upsampled bilinearly: h x w x 3 float32."""
    coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _blob(dx: np.ndarray, dy: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """A random smooth blob of radius ~r centred at (0, 0)."""
    phi = np.arctan2(dy, dx)
    k = rng.uniform(0.05, 0.2, size=3)
    ph = rng.uniform(0, 2 * np.pi, size=3)
    rad = r * (1 + k[0] * np.sin(2 * phi + ph[0]) + k[1] * np.sin(3 * phi + ph[1])
               + k[2] * np.sin(5 * phi + ph[2]))
    return dx * dx + dy * dy <= rad * rad


def render_scene(rng: np.random.Generator, spec: Spec = Spec(),
                 palettes: Optional[np.ndarray] = None, instances: bool = False) -> tuple:
    """One image (H x W x 3 uint8) and its label (H x W uint8); also the objects drawn,
    as (class, period index, palette index) triples: -> (image, label, modes), and with
    ``instances`` an H x W map of which object (1-based index into modes, 0 background)
    each pixel shows -- to measure accuracy per appearance mode."""
    if palettes is None:
        palettes = world_palettes(spec)
    families = FAMILIES[spec.textures]
    h, w = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    img = _smooth_noise(h, w, rng, int(rng.integers(2, 5)))
    lab = np.zeros((h, w), dtype=np.uint8)
    inst = np.zeros((h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    modes = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        cls = int(rng.integers(1, NUM_CLASSES))
        k, q = int(rng.integers(3)), int(rng.integers(spec.palettes))
        r = rng.uniform(*spec.radius)
        cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
        m = _blob(xx - cx, yy - cy, r, rng)
        if not m.any():
            continue
        kind = families[cls - 1]
        t = texture(kind, PERIODS[kind][k], xx, yy, rng)[..., None]
        c1, c2 = palettes[cls - 1, q] + rng.normal(0, 6, size=(2, 3)).astype(np.float32)
        fill = c1 * (1 - t) + c2 * t
        img[m] = fill[m]
        lab[m] = cls
        modes.append((cls, k, q))
        inst[m] = len(modes)
    # Ignore band: pixels whose right or lower neighbour has another class.
    edge = np.zeros_like(lab, dtype=bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    lab[edge] = 255
    # Mild global colour jitter (contrast, brightness, per-channel gain) and pixel noise:
    # small enough that a palette stays recognisable, so that colour is a cue a small
    # network learns fast -- for the palettes it has seen labeled.
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8)
    img = img * rng.uniform(0.96, 1.04, size=3) + rng.normal(0, 2, size=img.shape)
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return (img, lab, modes, inst) if instances else (img, lab, modes)


# --------------------------------------------------------------------------- writing


def _meta(n_train: Optional[int], n_val: Optional[int], seed: Optional[int], spec: Spec) -> dict:
    return {"dataset": "synthetic-v2", "version": VERSION, "revision": REVISION,
            "n_train": n_train, "n_val": n_val, "seed": seed,
            "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}}


def is_complete(root: str, n_train: Optional[int] = None, n_val: Optional[int] = None,
                seed: Optional[int] = None, spec: Optional[Spec] = None) -> bool:
    """True when ``root`` holds a finished v2 generation (with these counts, seed and spec
    where given; None accepts any)."""
    want = _meta(n_train, n_val, seed, spec or Spec())
    if spec is None:
        want["spec"] = None
    return marker_matches(root, want)


def scene_rng(seed: int, side_no: int, i: int) -> np.random.Generator:
    """The generator of image ``i`` of side ``side_no`` (0 train, 1 val) of a set made
    with ``seed``: re-rendering with it gives the stored image exactly."""
    return _rng(seed, side_no, i)


def _rng(seed: int, side_no: int, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 2, side_no, i]))


def generate(root: str, n_train: int = DEFAULT_TRAIN, n_val: int = DEFAULT_VAL,
             seed: int = DEFAULT_SEED, spec: Spec = Spec()) -> str:
    """(Re)generate the set under ``root``; returns ``root``."""
    pal = world_palettes(spec)

    def side(side_no):
        return lambda i: render_scene(_rng(seed, side_no, i), spec, pal)[:2]

    return write_tree(root, _meta(n_train, n_val, seed, spec),
                      {"train": (n_train, side(0)), "val": (n_val, side(1))})


def ensure(root: Optional[str] = None, n_train: Optional[int] = None,
           n_val: Optional[int] = None, seed: Optional[int] = None,
           spec: Optional[Spec] = None, verbose: bool = True) -> str:
    """Generate under ``root`` unless a complete set is there (with the given counts, seed
    and spec; None = any finished set, else the defaults 512 / 500 / 0 / ``Spec()``)."""
    root = root or default_root(spec or Spec())
    if not is_complete(root, n_train, n_val, seed, spec):
        n_train = DEFAULT_TRAIN if n_train is None else n_train
        n_val = DEFAULT_VAL if n_val is None else n_val
        seed = DEFAULT_SEED if seed is None else seed
        if verbose:
            print(f"cps_fast: generating synthetic-v2 ({n_train} train + {n_val} val images) "
                  f"in {root} ...", flush=True)
        generate(root, n_train, n_val, seed, spec or Spec())
    return root
