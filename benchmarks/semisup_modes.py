"""Where do pseudo-labels go wrong on synthetic-v2? Accuracy on the unlabeled training
images, per appearance mode, split by how often the labeled part showed that mode.

    python benchmarks/semisup_modes.py RUN_DIR [RUN_DIR ...] [--out FILE]

Each RUN_DIR is a ``python -m cps_fast.train`` run on synthetic-v2 (e.g. kept by
``benchmarks/semisup.py --workdir``). The unlabeled images of the run's partition are
re-rendered from the generator (bit-identical to the stored PNGs; checked), which gives each
pixel's object and that object's appearance mode (class, period, palette). For every
network of the run's last checkpoint it reports, grouped by how many labeled objects
showed the object's (class, palette):

- ``acc``: the fraction of the objects' pixels the network labels with their class (what
  a CPS pseudo-label is worth there);
- ``same_wrong``: for two networks, the fraction of the wrongly labeled pixels on which
  both networks chose the same wrong class -- errors the cross supervision confirms rather
  than corrects.

Records (one per run) go to ``--out`` (default benchmarks/results/semisup_modes.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import append_jsonl, commit, markdown_table  # noqa: E402

GROUPS = (("unseen", 0, 0), ("1-2", 1, 2), ("3-5", 3, 5), ("6+", 6, 10 ** 9))


def _index(sample_id: str) -> int:
    return int(sample_id.rsplit("_", 1)[1])


def analyse(run_dir: str) -> dict:
    from cps_fast.data import synthetic_v2 as v2
    from cps_fast.data.datasets import build_splits
    from cps_fast.data.generated import read_marker
    from cps_fast.data.io import read_image
    from cps_fast.data.transforms import val_transform
    from cps_fast.inference import load_networks

    torch.set_num_threads(1)
    ckpt = os.path.join(run_dir, "checkpoints", "last.pt")
    cfg, nets, _ = load_networks(ckpt, torch.device("cpu"), ["data.num_workers=0"])
    if cfg.data.dataset != "synthetic-v2":
        raise SystemExit(f"{run_dir}: a {cfg.data.dataset} run; this analysis is for synthetic-v2")
    splits = build_splits(cfg.data)
    meta = read_marker(splits.sources["root"])
    spec_d = dict(meta["spec"])
    spec = v2.Spec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_d.items()})
    pal = v2.world_palettes(spec)
    seed = meta["seed"]
    shown = Counter()
    for s in splits.labeled:
        for cls, _, q in v2.render_scene(v2.scene_rng(seed, 0, _index(s.id)), spec, pal)[2]:
            shown[(cls, q)] += 1
    names = [k for k in ("a", "b") if k in nets]
    tot = {g: {k: [0, 0] for k in names} for g, _, _ in GROUPS}  # [right, counted]
    wrong_both = {g: [0, 0] for g, _, _ in GROUPS}              # [same wrong, wrong in a]
    objects = Counter()
    for n, s in enumerate(splits.unlabeled):
        img, lab, modes, inst = v2.render_scene(v2.scene_rng(seed, 0, _index(s.id)), spec, pal,
                                                instances=True)
        if n == 0 and not np.array_equal(read_image(s.image), img):
            raise SystemExit(f"{s.image}: the re-rendered image differs from the stored one")
        x, _ = val_transform(img, None, cfg.data)
        with torch.no_grad():
            pred = {k: nets[k](x[None]).argmax(1)[0].numpy() for k in names}
        for j, (cls, _, q) in enumerate(modes, start=1):
            px = (inst == j) & (lab == cls)
            if not px.any():
                continue
            c = shown[(cls, q)]
            g = next(name for name, lo, hi in GROUPS if lo <= c <= hi)
            objects[g] += 1
            for k in names:
                tot[g][k][0] += int((pred[k][px] == cls).sum())
                tot[g][k][1] += int(px.sum())
            if len(names) == 2:
                wa = pred["a"][px] != cls
                wrong_both[g][0] += int((wa & (pred["a"][px] == pred["b"][px])).sum())
                wrong_both[g][1] += int(wa.sum())
    rec = {"benchmark": "semisup_modes", "run": os.path.basename(os.path.normpath(run_dir)),
           "method": cfg.train.method, "split": cfg.data.split, "seed": cfg.train.seed,
           "iters": cfg.train.iters, "cps_weight": cfg.loss.cps_weight, "commit": commit(),
           "labeled_images": len(splits.labeled), "unlabeled_images": len(splits.unlabeled),
           "palettes_shown": len(shown), "palettes_total": int(pal.shape[0] * pal.shape[1]),
           "groups": {}}
    for g, _, _ in GROUPS:
        d = {"objects": objects[g]}
        for k in names:
            r, c = tot[g][k]
            d[f"acc_{k}"] = r / c if c else None
        if len(names) == 2:
            sw, w = wrong_both[g]
            d["same_wrong"] = sw / w if w else None
        rec["groups"][g] = d
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "semisup_modes.jsonl"))
    args = p.parse_args(argv)
    rows = []
    for run in args.runs:
        rec = analyse(run)
        append_jsonl(args.out, [rec])
        for g, d in rec["groups"].items():
            rows.append({"run": rec["run"], "palette shown": g, **d})
    print(markdown_table(rows, ["run", "palette shown", "objects", "acc_a", "acc_b",
                                "same_wrong"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
