"""Recorded supervised baselines, so that a run can say how it compares with one.

``baselines.json`` (beside this file, committed) holds, for a few settings, the supervised
baseline measured by ``benchmarks/semisup.py`` (same iterations, batch 8 labeled, network
a, per seed) -- written by ``benchmarks/semisup.py --write-baselines``, never by hand. A
setting is a handful of config keys; a run matches an entry when its config has every
one of those values. ``compare_line(cfg, final_eval)`` is the line ``python -m
cps_fast.train`` prints at the end of a run.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Optional

from .config import Config

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baselines.json")
# The config keys that make two runs comparable (a baseline entry records their values).
SETTING_KEYS = ("data.dataset", "data.split", "data.split_seed", "data.crop_size",
                "data.batch_size", "data.scales", "model.backbone", "optim.lr", "train.iters")


def setting_of(cfg: Config) -> dict:
    """The values of ``SETTING_KEYS`` in ``cfg`` (tuples as lists, as JSON holds them)."""
    d = cfg.to_dict()
    out = {}
    for key in SETTING_KEYS:
        node = d
        for part in key.split("."):
            node = node[part]
        out[key] = list(node) if isinstance(node, tuple) else node
    return out


def load_table(path: str = TABLE) -> list:
    try:
        with open(path) as f:
            return json.load(f).get("baselines", [])
    except (OSError, ValueError):
        return []


def find(cfg: Config, path: str = TABLE) -> Optional[dict]:
    """The table entry whose setting ``cfg`` matches (None: no recorded baseline)."""
    mine = setting_of(cfg)
    for entry in load_table(path):
        if all(mine.get(k) == v for k, v in entry.get("setting", {}).items()):
            return entry
    return None


def compare_line(cfg: Config, final_eval: Optional[dict], path: str = TABLE) -> str:
    """One line: this run's network a against the recorded supervised baseline."""
    s = setting_of(cfg)
    where = f"{s['data.dataset']}, {s['data.split']} labels, {s['train.iters']} iterations"
    entry = find(cfg, path)
    if entry is None:
        return (f"no recorded supervised baseline for this setting ({where}); "
                f"benchmarks/semisup.py measures one")
    if not final_eval or final_eval.get("miou_a") is None:
        return f"recorded supervised baseline ({where}) found, but this run has no final mIoU"
    per_seed = {int(k): 100 * v for k, v in entry["supervised_miou_a"].items()}
    vals = list(per_seed.values())
    mean = statistics.mean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    mine = 100 * final_eval["miou_a"]
    seed = cfg.train.seed
    paired = ""
    if seed in per_seed:
        paired = f"; {mine - per_seed[seed]:+.2f} against seed {seed}'s {per_seed[seed]:.2f}"
    return (f"against the recorded supervised baseline of this setting ({where}; "
            f"{len(vals)} seeds, {entry.get('source', 'benchmarks/results')}): supervised "
            f"{mean:.2f} ± {std:.2f} mIoU; this run ({cfg.train.method}), network a: "
            f"{mine:.2f} ({mine - mean:+.2f}{paired})")
