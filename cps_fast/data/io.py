"""Reading images and label maps, strictly.

Every reader forces a full decode (PIL opens lazily and would otherwise only fail, or
silently pad a truncated JPEG, deep inside a worker), and turns any failure into a
``DataError`` that names the file, so that a bad file is reported as one clear line.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image, ImageFile

from ..errors import DataError

# Label images are class indices. These modes hold indices; anything else (RGB colour
# masks, alpha) is a mistake we report instead of guessing a colour -> class mapping.
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L", "1")


def _open_loaded(path: str) -> Image.Image:
    """Open and fully decode ``path``; raise DataError naming it on any failure."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched on PIL's global "pad truncated images" flag; we would then accept
        # half-grey training images silently. Refuse rather than train on them.
        raise DataError(f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; "
                        "cps_fast refuses to read possibly truncated images")
    try:
        # We own the file handle, so it is closed on every path, errors included; after
        # load() the pixels are in memory and the image no longer needs the file.
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # force the whole decode: truncated or corrupt data fails here
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None
    return img


def read_image(path: str) -> np.ndarray:
    """Read an image as an ``H x W x 3`` uint8 RGB array (grey/CMYK/alpha converted)."""
    img = _open_loaded(path)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_label(path: str, lut: Optional[np.ndarray], num_classes: int,
               ignore_index: int = 255) -> np.ndarray:
    """Read a label map as an ``H x W`` uint8 array of class indices.

    Palette ('P') PNGs are read as their indices, not their colours. ``lut`` (256,) is
    applied to the raw values first (e.g. Cityscapes labelIds -> trainIds). Values outside
    ``[0, num_classes) U {ignore_index}`` raise DataError naming the file and the values.
    """
    img = _open_loaded(path)
    if img.mode not in _INDEX_MODES:
        raise DataError(f"{path}: label image has mode {img.mode!r}; expected class indices "
                        "(a single-channel or palette PNG), not a colour mask")
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            bad = np.unique(arr[(arr < 0) | (arr > 255)])[:8]
            raise DataError(f"{path}: label values {bad.tolist()} do not fit in 0..255")
        arr = arr.astype(np.uint8)
    if lut is not None:
        arr = lut[arr]
    check_label_values(arr, path, num_classes, ignore_index)
    return np.ascontiguousarray(arr)


def check_label_values(arr: np.ndarray, path: str, num_classes: int, ignore_index: int) -> None:
    """Raise DataError if ``arr`` holds values outside the classes and the ignore value."""
    if arr.size == 0 or int(arr.max()) < num_classes:  # the common case: one cheap pass
        return
    bad_mask = (arr >= num_classes) & (arr != ignore_index)
    if bad_mask.any():
        bad = np.unique(arr[bad_mask])
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise DataError(f"{path}: label values {shown} outside 0..{num_classes - 1} "
                        f"and ignore {ignore_index} ({int(bad_mask.sum())} pixels)")


def read_pair(image_path: str, label_path: Optional[str], lut: Optional[np.ndarray],
              num_classes: int, ignore_index: int = 255):
    """Read an image and (optionally) its label, checking that their sizes agree."""
    image = read_image(image_path)
    if label_path is None:
        return image, None
    label = read_label(label_path, lut, num_classes, ignore_index)
    if image.shape[:2] != label.shape:
        raise DataError(f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} "
                        f"but label {label_path} is {label.shape[1]}x{label.shape[0]}")
    return image, label
