"""Dataset validation: find every problem at once, before hours of training.

``check_dataset(splits, mode)`` returns a list of one-line problems (empty: all good):

- ``fast`` (what the trainer runs at start): every listed file exists, labeled and
  unlabeled are disjoint, and a fixed sample of each split decodes with valid labels;
- ``full``: every image (and every labeled / validation label) decodes, label values are in
  range and sizes agree.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import numpy as np

from ..errors import CpsFastError
from .datasets import Splits
from .io import read_pair

FAST_SAMPLE = 16  # images decoded per split in fast mode


def _check_one(job) -> Optional[str]:
    image, label, lut, num_classes, ignore = job
    try:
        read_pair(image, label, lut, num_classes, ignore)
    except CpsFastError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a problem to report
        return f"{image}: {type(e).__name__}: {e}"
    return None


def _jobs(samples, splits: Splits, with_labels: bool):
    info = splits.info
    return [(s.image, s.label if with_labels else None, info.label_lut, info.num_classes,
             info.ignore_index) for s in samples]


def check_dataset(splits: Splits, mode: str = "fast", workers: int = 0) -> list:
    """Problems with the dataset behind ``splits`` (see module docstring)."""
    if mode not in ("fast", "full"):
        raise ValueError(f"check mode {mode!r}: fast or full")
    problems = list(splits.problems)

    # Overlap of labeled and unlabeled (build_splits reports it too when not strict).
    both = sorted({s.id for s in splits.labeled} & {s.id for s in splits.unlabeled})
    if both and not any("also in the labeled list" in p for p in problems):
        problems.append(f"labeled and unlabeled splits share {len(both)} ids: "
                        f"{', '.join(both[:5])}")

    # Existence of every file each split needs.
    sides = (("labeled", splits.labeled, True), ("unlabeled", splits.unlabeled, False),
             ("val", splits.val, True))
    for side, samples, need_label in sides:
        missing = [p for s in samples for p in ((s.image, s.label) if need_label else (s.image,))
                   if p is None or not os.path.isfile(p)]
        if missing:
            problems.append(f"{side}: {len(missing)} files missing: "
                            f"{', '.join(str(m) for m in missing[:5])}")

    # Decoding: every file (full) or a fixed sample per split (fast).
    jobs, seen = [], set()
    for side, samples, need_label in sides:
        if mode == "fast" and len(samples) > FAST_SAMPLE:
            pick = np.random.default_rng(0).choice(len(samples), FAST_SAMPLE, replace=False)
            samples = [samples[i] for i in sorted(pick)]
        for job in _jobs(samples, splits, need_label):
            if (job[0], job[1]) not in seen and os.path.isfile(job[0]) and \
                    (job[1] is None or os.path.isfile(job[1])):
                seen.add((job[0], job[1]))
                jobs.append(job)
    if workers > 0 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(_check_one, jobs, chunksize=32))
    else:
        results = [_check_one(j) for j in jobs]
    problems += [r for r in results if r]
    return problems
