"""Split lists and partitions: the list formats researchers bring, and seeded partitions.

A split list names the images of one split, one per line, in one of three formats, detected
per file from its content:

- ``ids``       one bare id per line: the CPS VOC lists (``2007_000032``);
- ``cps``       ``image<TAB>label`` paths relative to the data root: the CPS Cityscapes lists
                (``/images/train/x.png<TAB>/segmentation/train/x_gtFine.png``);
- ``unimatch``  ``image label`` separated by a space, relative to the root: UniMatch's and
                U2PL's ``splits/<dataset>/<n>/{labeled,unlabeled}.txt``
                (``JPEGImages/x.jpg SegmentationClass/x.png``, ``leftImg8bit/train/c/
                x_leftImg8bit.png gtFine/train/c/x_gtFine_labelTrainIds.png``).

A line holding a single image path (no label) fits either path format. CRLF, a UTF-8 BOM,
trailing blanks, blank lines and ``#`` comments are tolerated; a line that fits no format,
or a file that mixes formats, is an error naming the file and the line number. Every format
resolves through the sample id (the file name without extension and without Cityscapes'
``_leftImg8bit``), so a list written for one dataset tree works on another layout of it.

Where the lists of a partition live (``data.split_dir``) is found by ``find_split_files``:
a UniMatch folder of one partition (``labeled.txt`` inside), a UniMatch tree
(``<n>/labeled.txt``, ``1_8/labeled.txt``, optionally one dataset folder further down), or
the CPS file naming (``train_aug_labeled_1-8.txt``, ``pseudoseg_labeled_1-8.txt``).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

from ..config import parse_split
from ..errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
LIST_FORMATS = ("ids", "cps", "unimatch")       # what write_list writes; read_list also
                                                # reports "paths" (image paths only)
_FORMAT_WORDS = {"ids": "bare ids", "cps": "'image<TAB>label' paths (CPS)",
                 "unimatch": "'image label' paths (UniMatch)", "paths": "image paths"}


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class ListEntry:
    id: str
    image: Optional[str] = None   # as written in the list (relative to the root)
    label: Optional[str] = None


def id_from_path(path: str) -> str:
    """``/images/train/jena_000078_000019.png`` -> ``jena_000078_000019``; also strips the
    Cityscapes ``_leftImg8bit`` suffix so that CPS and official trees share ids."""
    stem = os.path.splitext(os.path.basename(path.replace("\\", "/")))[0]
    return stem[: -len("_leftImg8bit")] if stem.endswith("_leftImg8bit") else stem


def _is_image_path(token: str) -> bool:
    return token.lower().endswith(IMAGE_EXTENSIONS)


def _classify(line: str) -> tuple:
    """(kind, entry) of one stripped, non-empty line; kind in ids | cps | unimatch | path.
    Raises ValueError with the reason when the line fits no format."""
    if "\t" in line:
        fields = [f.strip() for f in line.split("\t") if f.strip()]
        if len(fields) > 2:
            raise ValueError(f"{len(fields)} TAB-separated fields (expected image<TAB>label)")
        if not all(_is_image_path(f) for f in fields):
            raise ValueError("TAB-separated fields that are not image paths")
        if len(fields) == 1:
            return "path", ListEntry(id_from_path(fields[0]), fields[0])
        return "cps", ListEntry(id_from_path(fields[0]), fields[0], fields[1])
    tokens = line.split()
    if len(tokens) == 1:
        tok = tokens[0]
        if _is_image_path(tok):
            return "path", ListEntry(id_from_path(tok), tok)
        if "/" in tok or "\\" in tok:
            raise ValueError("a path that does not name an image file")
        return "ids", ListEntry(tok)
    if len(tokens) == 2 and all(_is_image_path(t) for t in tokens):
        return "unimatch", ListEntry(id_from_path(tokens[0]), tokens[0], tokens[1])
    raise ValueError(f"{len(tokens)} space-separated fields that are not 'image label' paths")


@dataclass
class SplitList:
    """A parsed list file: its entries and the format they were written in."""
    path: str
    format: str          # ids | cps | unimatch | paths
    entries: list


def parse_split_list(path: str) -> SplitList:
    """Read and parse one split list; every problem is a DataError naming ``path[:line]``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: split list not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a split list") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read split list ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: split list is not UTF-8 text") from None
    entries, fmt, fmt_line, path_line = [], None, 0, 0
    for lineno, line in enumerate(text.splitlines(), 1):  # \n, \r\n and \r
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            kind, entry = _classify(line)
        except ValueError as e:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise DataError(f"{path}:{lineno}: cannot parse {shown!r}: {e}; expected a bare id, "
                            "'image<TAB>label' (CPS) or 'image label' (UniMatch)") from None
        if kind == "path":  # one image path fits either path format, but not a list of ids
            if fmt == "ids":
                raise DataError(f"{path}:{lineno}: an image path in a list of bare ids "
                                f"(line {fmt_line}); one format per file")
            path_line = path_line or lineno
        elif kind == "ids" and path_line:
            raise DataError(f"{path}:{lineno}: a bare id in a list of image paths "
                            f"(line {path_line}); one format per file")
        elif fmt is None:
            fmt, fmt_line = kind, lineno
        elif kind != fmt:
            raise DataError(f"{path}:{lineno}: {_FORMAT_WORDS[kind]} in a list of "
                            f"{_FORMAT_WORDS[fmt]} (line {fmt_line}); one format per file")
        entries.append(entry)
    if not entries:
        raise DataError(f"{path}: split list is empty")
    return SplitList(path, fmt or "paths", entries)


def read_list(path: str) -> list:
    """The entries of a split list in any supported format (see the module docstring)."""
    return parse_split_list(path).entries


# --------------------------------------------------------------------------- writing


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def format_line(sample, fmt: str, root: Optional[str]) -> str:
    """One line of ``fmt`` for a Sample (``id``, absolute ``image``/``label`` paths)."""
    if fmt == "ids":
        return sample.id
    if not root:
        raise ValueError(f"split list format {fmt} needs the data root")
    if fmt == "cps":  # the official Cityscapes lists: root-relative with a leading '/'
        img = "/" + _rel(sample.image, root)
        return f"{img}\t/{_rel(sample.label, root)}" if sample.label else img
    if fmt == "unimatch":
        img = _rel(sample.image, root)
        return f"{img} {_rel(sample.label, root)}" if sample.label else img
    raise ValueError(f"unknown split list format {fmt!r} ({', '.join(LIST_FORMATS)})")


def write_list(path: str, samples: list, root: Optional[str] = None, paths: bool = False,
               fmt: Optional[str] = None) -> None:
    """Write a split list atomically, Unix newlines. ``fmt``: ``ids`` (default), ``cps``
    (``/image<TAB>/label`` relative to ``root``, as the official Cityscapes lists; also
    ``paths=True``) or ``unimatch`` (``image label`` relative to ``root``)."""
    fmt = fmt or ("cps" if paths else "ids")
    lines = [format_line(s, fmt, root) for s in samples]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- naming


def split_tag(split: str) -> str:
    """'1/8' -> '1-8'; '183' -> '183' (the CPS file naming)."""
    return str(split).strip().replace("/", "-")


def unimatch_tag(split: str) -> str:
    """'1/8' -> '1_8'; '183' -> '183' (UniMatch's folder naming)."""
    return str(split).strip().replace("/", "_")


def split_aliases(split: str, pool_size: Optional[int] = None) -> list:
    """The partition ``split`` under every name it goes by, itself first: with the size of
    the pool it is drawn from, a fraction is also its count and a count also the fractions
    1/2 ... 1/64 that round up to it (1464 images: '1/16' == '92')."""
    split = str(split).strip()
    names = [split]
    if pool_size:
        kind, _ = parse_split(split)
        if kind == "fraction":
            names.append(str(labeled_count(pool_size, split)))
        else:
            names += [f"1/{d}" for d in (2, 4, 8, 16, 32, 64)
                      if -(-pool_size // d) == int(split)]
    return names


_DATASET_FOLDERS = {"voc": ("pascal", "voc", "pascal_voc", "voc2012"),
                    "cityscapes": ("cityscapes", "city")}


def _pick(cands: list, prefer) -> Optional[str]:
    """The one candidate, or the one preferred candidate among several; None if ambiguous."""
    if len(cands) == 1:
        return cands[0]
    pref = [c for c in cands if prefer(c)]
    return pref[0] if len(pref) == 1 else None


def find_split_files(split_dir: str, split: str, pool: str = "train",
                     pool_size: Optional[int] = None, dataset: Optional[str] = None) -> tuple:
    """``(labeled_list, unlabeled_list or None)`` of partition ``split`` under ``split_dir``.

    Looked for, in order:

    1. ``split_dir/labeled.txt`` (+ ``unlabeled.txt``): a UniMatch folder of one partition,
       e.g. ``splits/pascal/92``; ``split`` is then not consulted.
    2. ``split_dir[/<dataset>]/<tag>/labeled.txt``: a UniMatch tree, ``<tag>`` any name of the
       partition (``1_8``, ``1323``, ``92``); with several dataset folders, the one named
       after ``dataset`` (``pascal``/``voc``, ``cityscapes``/``city``).
    3. ``*labeled_<tag>.txt`` / ``*unlabeled_<tag>.txt`` up to two folders down (the CPS
       naming, e.g. ``subset_train_aug/train_aug_labeled_1-8.txt``). ``pool="fine"`` (the
       few-label protocol) takes only the ``pseudoseg_`` lists; otherwise ``train_aug_`` is
       preferred when several match.
    """
    if not os.path.isdir(split_dir):
        raise DataError(f"data.split_dir: {split_dir} is not a directory")
    unl = lambda d: (os.path.join(d, "unlabeled.txt")  # noqa: E731
                     if os.path.isfile(os.path.join(d, "unlabeled.txt")) else None)
    if os.path.isfile(os.path.join(split_dir, "labeled.txt")):
        return os.path.join(split_dir, "labeled.txt"), unl(split_dir)

    names = split_aliases(split, pool_size)
    base = glob.escape(split_dir)
    folders = _DATASET_FOLDERS.get(dataset or "", ())
    for depth in ("", "*"):
        for n in names:  # the name given first: '1_16' before its alias '92'
            cands = sorted(glob.glob(os.path.join(base, depth, unimatch_tag(n), "labeled.txt")))
            if not cands:
                continue
            pick = _pick(cands, lambda p: os.path.basename(os.path.dirname(os.path.dirname(p)))
                         .lower() in folders)
            if pick is None:
                raise DataError(f"data.split_dir: several lists for split {split}: "
                                f"{', '.join(cands[:4])}; point data.split_dir at one of them")
            return pick, unl(os.path.dirname(pick))

    def wanted(p: str) -> bool:
        return ("pseudoseg" in os.path.basename(p)) == (pool == "fine")

    labeled: list = []
    for depth in ("", "*", "*/*"):
        for n in names:
            for p in glob.glob(os.path.join(base, depth, f"*labeled_{split_tag(n)}.txt")):
                # '*labeled_' also matches the '..._unlabeled_' lists: those are partners.
                if (not re.search(r"(^|_)unlabeled_", os.path.basename(p)) and wanted(p)
                        and p not in labeled):
                    labeled.append(p)
        if labeled:
            break
    what = "pseudoseg_labeled" if pool == "fine" else "labeled"
    labeled.sort()
    if not labeled:
        tags = "|".join(dict.fromkeys(split_tag(n) for n in names))
        raise DataError(f"data.split_dir: no labeled list for split {split} in {split_dir} "
                        f"(looked for labeled.txt, <{'|'.join(unimatch_tag(n) for n in names)}>/"
                        f"labeled.txt and *{what}_<{tags}>.txt)")
    pick = _pick(labeled, lambda p: os.path.basename(p).startswith("train_aug_"))
    if pick is None:
        raise DataError(f"data.split_dir: several labeled lists for split {split}: "
                        f"{', '.join(labeled[:4])}; name one with data.labeled_list")
    # The unlabeled list that goes with it: the same name with 'unlabeled' for 'labeled'.
    head, name = os.path.split(pick)
    partner = os.path.join(head, re.sub(r"(^|_)labeled_", r"\1unlabeled_", name, count=1))
    if os.path.isfile(partner):
        return pick, partner
    if pool == "fine":  # the few-label protocol does not need one
        return pick, None
    raise DataError(f"data.split_dir: {pick} has no unlabeled partner {os.path.basename(partner)}")


# --------------------------------------------------------------------------- partitions


def labeled_count(n: int, split: str) -> int:
    """Number of labeled images for ``split`` over ``n`` images. Fractions round up, which
    reproduces the official counts (10582 -> 662/1323/2646/5291; 2975 -> 186/372/744/1488;
    the 1464 fine VOC images -> 92/183/366/732)."""
    kind, _ = parse_split(split)
    if kind == "fraction":
        frac = Fraction(str(split).strip())
        k = -(-n * frac.numerator // frac.denominator)
    else:
        k = int(str(split).strip())
    if k > n:
        raise ConfigError(f"data.split: {split} asks for {k} labeled images but the list "
                          f"they are drawn from has only {n}")
    return k


def make_partition(ids: list, split: str, seed: int) -> tuple:
    """Seeded partition of ``ids`` into (labeled, unlabeled), disjoint, both in list order.

    Depends only on (ids in order, split, seed): the same inputs give the same lists bitwise.
    """
    k = labeled_count(len(ids), split)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x5C17])))
    chosen = np.zeros(len(ids), dtype=bool)
    chosen[rng.permutation(len(ids))[:k]] = True
    labeled = [i for i, c in zip(ids, chosen) if c]
    unlabeled = [i for i, c in zip(ids, chosen) if not c]
    return labeled, unlabeled


__all__ = [
    "IMAGE_EXTENSIONS", "LIST_FORMATS", "ListEntry", "SplitList", "find_split_files",
    "format_line", "id_from_path", "labeled_count", "make_partition", "parse_split_list",
    "read_list", "split_aliases", "split_tag", "unimatch_tag", "write_list",
]
