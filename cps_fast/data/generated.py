"""Writing the datasets that cps_fast generates itself (synthetic-v2, fashion mosaics).

They are written in the CPS release layout of PASCAL VOC, with lossless PNG images, so
that they go through exactly the reader VOC goes through::

    ROOT/train/image/train_00000.png   RGB
    ROOT/train/label/train_00000.png   palette PNG whose indices are the classes (255 ignore)
    ROOT/val/image/..., ROOT/val/label/...
    ROOT/train.txt, ROOT/val.txt       the ids, one a line
    ROOT/COMPLETE.json                 what was generated (written last)

Every file is written atomically and the marker last, so an interrupted generation is
redone, and concurrent ranks produce identical files.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np
from PIL import Image

from ..errors import DataError
from .info import voc_palette

MARKER = "COMPLETE.json"


def data_home() -> str:
    """``$CPS_FAST_DATA_HOME``, else ``~/.cache/cps_fast``: where generated sets live."""
    return os.environ.get("CPS_FAST_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "cps_fast")


def atomic_save(pil_img: Image.Image, path: str, **kw) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    pil_img.save(tmp, **kw)
    os.replace(tmp, path)


def atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def read_marker(root: str) -> Optional[dict]:
    """The marker's contents, or None when ``root`` holds no finished generation."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def marker_matches(root: str, want: dict) -> bool:
    """True when ``root`` is finished and its marker agrees with every non-None value of
    ``want`` (None accepts anything, e.g. a small set a test made)."""
    meta = read_marker(root)
    return meta is not None and all(v is None or meta.get(k) == v for k, v in want.items())


_OURS = {"train", "val", "train.txt", "val.txt", MARKER}


def check_target(root: str, dataset: str, ours: frozenset | set = frozenset(_OURS)) -> None:
    """Refuse to generate ``dataset`` into a folder that holds something else (another
    dataset, a finished generation of another generated set, or any foreign file): a
    mistyped data.dataset or --data-root must not overwrite a user's data."""
    meta = read_marker(root)
    if meta is not None and meta.get("dataset", "synthetic") != dataset:
        other = meta.get("dataset", f"synthetic (v{meta.get('version', 1)})")
        raise DataError(f"{root}: holds the generated {other} dataset, not {dataset}; choose "
                        f"another --data-root or set data.dataset={meta.get('dataset', 'synthetic')}")
    if os.path.isdir(root):
        foreign = sorted(n for n in os.listdir(root) if n not in ours and ".tmp" not in n)
        if foreign:
            raise DataError(f"{root}: is not an (unfinished) generated {dataset} dataset (it "
                            f"holds {', '.join(foreign[:3])}); {dataset} is generated only "
                            f"into an empty or new folder")


def label_image(lab: np.ndarray) -> Image.Image:
    """A palette PNG image whose indices are the classes (as VOC's label files)."""
    img = Image.frombytes("P", (lab.shape[1], lab.shape[0]), np.ascontiguousarray(lab).tobytes())
    img.putpalette(voc_palette(256).reshape(-1).tolist())
    return img


def write_tree(root: str, meta: dict, sides: dict[str, tuple[int, Callable[[int], tuple]]]) -> str:
    """(Re)write a generated dataset under ``root``: ``sides`` maps "train" / "val" to
    ``(count, render)``, ``render(i) -> (image HxWx3 uint8, label HxW uint8)``. The marker
    (``meta``) is written last. Returns ``root``."""
    check_target(root, meta["dataset"])
    try:
        os.makedirs(root, exist_ok=True)
        marker = os.path.join(root, MARKER)
        if os.path.exists(marker):
            os.remove(marker)
        for side, (n, render) in sides.items():
            img_dir, lab_dir = (os.path.join(root, side, k) for k in ("image", "label"))
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(lab_dir, exist_ok=True)
            ids = []
            for i in range(n):
                sid = f"{side}_{i:05d}"
                img, lab = render(i)
                # PNG: lossless, so that every pixel is exactly what the generator drew.
                atomic_save(Image.fromarray(img), os.path.join(img_dir, sid + ".png"),
                            format="PNG")
                atomic_save(label_image(lab), os.path.join(lab_dir, sid + ".png"), format="PNG")
                ids.append(sid)
            atomic_text(os.path.join(root, f"{side}.txt"), "\n".join(ids) + "\n")
        atomic_text(marker, json.dumps(meta, sort_keys=True) + "\n")  # last
    except OSError as e:
        raise DataError(f"{root}: cannot write the generated dataset ({e.strerror or e})") from None
    return root
