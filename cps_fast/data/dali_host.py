"""Host side of the DALI input path: read encoded files, check them, prepare label bytes.

DALI decodes; the host only reads bytes and looks at headers, which costs microseconds per
file, so that

- a missing, unreadable, truncated or non-image file fails as ``DataError`` naming the file
  before DALI ever sees it (DALI would report ``nvImageCodec failure: '#4'`` with no name);
- the image size is known on the host, where the augmentation parameters are drawn (the
  crop range depends on it), so that the DALI path draws the very same values as the
  PyTorch path (``transforms.draw_params``);
- image and label sizes are checked against each other, as ``io.read_pair`` does;
- label PNGs reach DALI as 8-bit *grayscale* PNGs, whose decoded value is the class index.

Why the label step: DALI decodes a palette PNG (VOC ``SegmentationClass``, the synthetic
set) to its *colours*; asking for GRAY then gives a luminance, not the class index. An 8-bit
palette PNG stores exactly the bytes an 8-bit grayscale PNG stores (one index per pixel), so
rewriting the header's colour type (3 -> 0) and dropping the palette chunks turns it into
a grayscale PNG whose values are the indices, with no decode and no re-encode. Anything else
(16-bit, 1/2/4-bit, non-PNG label files) is decoded on the host by ``io.read_label`` with
the same checks as the PyTorch path and re-encoded as an uncompressed grayscale PNG.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from .io import read_image, read_label

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# Formats DALI's image decoder reads (PIL names); others (GIF, ...) are decoded on the host.
_DALI_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM")
# Chunks a grayscale PNG keeps; everything else (PLTE, tRNS, bKGD, sBIT, hIST, gAMA, iCCP,
# text ...) is dropped when a palette PNG is rewritten.
_KEEP = (b"IHDR", b"IDAT", b"IEND")


def read_bytes(path: str) -> bytes:
    """The file's bytes; DataError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    if not data:
        raise DataError(f"{path}: file is empty")
    return data


def _png_ihdr(data: bytes) -> Optional[tuple]:
    """(width, height, bit_depth, colour_type, interlace) of a PNG, or None if not a PNG."""
    if len(data) < 33 or data[:8] != _PNG_SIG or data[12:16] != b"IHDR":
        return None
    w, h, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return w, h, depth, ctype, interlace


def _check_complete(data: bytes, fmt: str, path: str) -> None:
    """Cheap truncation check on the file's tail (DALI's GPU decoders may pad a truncated
    stream silently where PIL and DALI's CPU decoder refuse it)."""
    if fmt == "JPEG":
        if b"\xff\xd9" in data[-32:]:  # the common case: ends with end-of-image
            return
        # After the last start-of-scan, entropy-coded data byte-stuffs 0xFF, so an FFD9
        # behind the last FFDA is the end-of-image marker.
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise DataError(f"{path}: cannot decode image (truncated JPEG: no end-of-image "
                            "marker after the last scan)")
    elif fmt == "PNG":
        if data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
            raise DataError(f"{path}: cannot decode image (truncated PNG: no IEND chunk)")


def probe(raw: bytes, path: str) -> tuple:
    """(format, height, width, PIL mode) from the header only; DataError when it is not an
    image PIL recognises or is truncated."""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt, (w, h), mode = im.format, im.size, im.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None
    _check_complete(raw, fmt, path)
    return fmt, h, w, mode


def palette_png_as_gray(raw: bytes) -> bytes:
    """Rewrite an 8-bit palette PNG as the 8-bit grayscale PNG holding the same indices."""
    out, pos = [raw[:8]], 8
    while pos + 12 <= len(raw):
        (n,) = struct.unpack(">I", raw[pos:pos + 4])
        ctype = raw[pos + 4:pos + 8]
        if ctype == b"IHDR":
            body = raw[pos + 8:pos + 8 + n]
            body = body[:9] + b"\x00" + body[10:]  # colour type 3 (palette) -> 0 (grey)
            out.append(struct.pack(">I", n) + ctype + body
                       + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF))
        elif ctype in _KEEP:
            out.append(raw[pos:pos + 12 + n])
        pos += 12 + n
        if ctype == b"IEND":
            break
    return b"".join(out)


def encode_gray_png(label: np.ndarray) -> np.ndarray:
    """An ``H x W`` uint8 array as a fast (barely compressed) grayscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), "L").save(
        buf, format="PNG", compress_level=1)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def label_for_dali(raw: bytes, path: str, num_classes: int, ignore_index: int) -> tuple:
    """-> (grayscale-8 PNG bytes (uint8 array) whose values are the raw label values,
    height, width). The dataset's LUT (Cityscapes labelIds) is NOT applied here; the
    pipeline applies it.
    """
    ihdr = _png_ihdr(raw)
    if ihdr is not None:
        w, h, depth, ctype, _ = ihdr
        if depth == 8 and ctype in (0, 3):
            _check_complete(raw, "PNG", path)
            if ctype == 0:
                return np.frombuffer(raw, dtype=np.uint8), h, w
            return np.frombuffer(palette_png_as_gray(raw), dtype=np.uint8), h, w
        if ctype in (2, 6):  # RGB(A) colour masks: the PyTorch path refuses them too
            mode = "RGB" if ctype == 2 else "RGBA"
            raise DataError(f"{path}: label image has mode {mode!r}; expected class indices "
                            "(a single-channel or palette PNG), not a colour mask")
    # Rare formats: decode on the host with the PyTorch path's reader (same checks, raw
    # values: 256 'classes' so that no value is rejected before the LUT), re-encode.
    arr = read_label(path, None, 256, ignore_index)
    return encode_gray_png(arr), arr.shape[0], arr.shape[1]


@dataclass
class HostSample:
    """One sample ready for DALI: encoded bytes and the original size."""
    image: np.ndarray            # encoded image bytes (uint8)
    label: Optional[np.ndarray]  # grayscale-8 PNG bytes (uint8) or None
    height: int
    width: int


def prepare_sample(image_path: str, label_path: Optional[str], num_classes: int,
                   ignore_index: int = 255) -> HostSample:
    """Read and check one sample's files (see the module docstring)."""
    raw = read_bytes(image_path)
    fmt, h, w, _mode = probe(raw, image_path)
    if fmt in _DALI_FORMATS:
        img = np.frombuffer(raw, dtype=np.uint8)  # no copy
    else:  # rare: decode here (strictly, as the PyTorch path), hand DALI a fast PNG
        buf = io.BytesIO()
        Image.fromarray(read_image(image_path)).save(buf, format="PNG", compress_level=1)
        img = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    if label_path is None:
        return HostSample(img, None, h, w)
    lab, lh, lw = label_for_dali(read_bytes(label_path), label_path, num_classes, ignore_index)
    if (lh, lw) != (h, w):
        raise DataError(f"size mismatch: image {image_path} is {w}x{h} "
                        f"but label {label_path} is {lw}x{lh}")
    return HostSample(img, lab, h, w)


def find_bad_file(samples: Sequence, lut: Optional[np.ndarray], num_classes: int,
                  ignore_index: int = 255) -> Optional[DataError]:
    """After DALI failed on a batch: decode each of its samples with the PyTorch path's
    strict readers and return the DataError of the first bad file (None if all decode)."""
    for s in samples:
        try:
            read_image(s.image)
            if s.label is not None:
                read_label(s.label, lut, num_classes, ignore_index)
        except DataError as e:
            return e
    return None


def check_label_batch(labels: np.ndarray, samples: Sequence, num_classes: int,
                      ignore_index: int) -> None:
    """Raise DataError naming the label file when an output crop holds values outside the
    classes and the ignore value (CPU outputs; the PyTorch path checks whole files)."""
    if labels.size == 0 or int(labels.max()) < num_classes:
        return
    for lab, s in zip(labels, samples):
        bad = (lab >= num_classes) & (lab != ignore_index)
        if bad.any():
            vals = np.unique(lab[bad])
            shown = ", ".join(str(int(v)) for v in vals[:10])
            raise DataError(f"{s.label}: label values {shown} outside 0..{num_classes - 1} "
                            f"and ignore {ignore_index}")
