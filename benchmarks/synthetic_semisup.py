"""Does CPS help on the first synthetic set (synthetic-v1, preset ``synthetic-v1``)? CPS
against the supervised baseline at 1/8 labels and the same number of iterations, over
several seeds. (It does not: v1 is not label-limited. ``benchmarks/semisup.py`` measures
the benchmarks built for the question, synthetic-v2 and the Fashion-MNIST mosaics.)

    python benchmarks/synthetic_semisup.py [--seeds 0,1,2] [--variants supervised,cps,...]
                                           [--iters 1200] [--jobs 2]

Variants are the synthetic preset with ``--method`` and extra ``--set`` overrides:

  supervised        the labeled 1/8 only (one network, batch 8)
  cps               CPS, lambda = 1.5 from the first step (the paper's schedule)
  cps_rampup        CPS with lambda ramped up over the first 300 iterations
  cps_w05           CPS with lambda = 0.5 (the pseudo-label term weaker than the labels')

The data partition is the same for every run (``data.split_seed`` 0); ``train.seed`` varies
the initialisation, the data order and the augmentation. ``--split`` sets the labeled part
(1/8 or a count such as 16).

``--pretrain DIR`` first builds a stand-in for the paper's ImageNet start: the supervised
baseline trained on a *different* synthetic set (generation seed 12345, every image
labeled) for ``--pretrain-iters``; its checkpoint, DIR/run/checkpoints/last.pt, then gives
every variant its backbone (``model.pretrained``; heads start from scratch, as in the
paper). ``--pretrained CKPT`` reuses such a checkpoint. Each run is a separate process
with one torch thread and in-process data loading, ``--jobs`` at a time. Records (final
mIoU of each network, wall time) are appended to
``benchmarks/results/synthetic_semisup.jsonl`` and summarised as mean ± std per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import append_jsonl, commit, markdown_table  # noqa: E402

VARIANTS = {
    "supervised": ["--method", "supervised"],
    "cps": ["--method", "cps"],
    "cps_rampup": ["--method", "cps", "--set", "loss.cps_rampup=300"],
    "cps_w05": ["--method", "cps", "--set", "loss.cps_weight=0.5"],
}


PRETRAIN_SEED = 12345
# The first synthetic set (v1) and its settings; benchmarks/semisup.py measures synthetic-v2.
PRESET = "synthetic-v1"


def pretrain(workdir: str, iters: int) -> str:
    """Supervised on a separately generated synthetic set, all labeled; its checkpoint."""
    from cps_fast.data.synthetic import generate_synthetic
    data = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(data, "ImageSets", "Segmentation", "train.txt")):
        generate_synthetic(data, seed=PRETRAIN_SEED)
    with open(os.path.join(data, "ImageSets", "Segmentation", "train.txt")) as f:
        n = sum(1 for line in f if line.strip())
    out = os.path.join(workdir, "run")
    ckpt = os.path.join(out, "checkpoints", "last.pt")
    if not os.path.exists(ckpt):
        # n - 1 labeled: a partition needs one unlabeled image; the baseline ignores it.
        subprocess.run([sys.executable, "-m", "cps_fast.train", "--preset", PRESET,
                        "--method", "supervised",
                        "--data-root", data, "--split", str(n - 1), "--iters", str(iters),
                        "--out", out, "--quiet", "--set", "eval.every=0"],
                       check=True, cwd=ROOT)
    return ckpt


def run_one(variant: str, seed: int, iters: int, workdir: str, split: str,
            pretrained: str | None) -> dict:
    out = os.path.join(workdir, f"{variant}-{seed}")
    extra = ["--set", f"model.pretrained={pretrained}"] if pretrained else []
    cmd = [sys.executable, "-m", "cps_fast.train", "--preset", PRESET, "--iters", str(iters),
           "--out", out,
           "--quiet", "--set", f"train.seed={seed}", "--set", "train.threads=1",
           "--set", "data.num_workers=0", "--set", "eval.every=0", "--split", split,
           *extra, *VARIANTS[variant]]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.time() - t0
    rec = {"benchmark": "synthetic_semisup", "variant": variant, "seed": seed, "iters": iters,
           "wall_s": wall, "commit": commit(), "device": "cpu", "split": split,
           "init": "pretrained" if pretrained else "scratch"}
    if pretrained:
        rec["pretrained"] = pretrained
    if r.returncode != 0:
        rec["failed"] = (r.stderr.strip().splitlines() or ["?"])[-1]
        return rec
    evals = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))
             if '"kind": "eval"' in line]
    last = evals[-1]
    rec.update({k: last[k] for k in ("miou", "miou_a", "miou_b") if k in last})
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="supervised,cps,cps_rampup")
    p.add_argument("--iters", type=int, default=1200)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--split", default="1/8", help="labeled part: 1/8 ... or a count")
    p.add_argument("--pretrain", default=None, metavar="DIR",
                   help="build the stand-in pretrained backbone in DIR first (kept)")
    p.add_argument("--pretrain-iters", type=int, default=1200)
    p.add_argument("--pretrained", default=None, metavar="CKPT",
                   help="a cps_fast checkpoint whose backbone every variant starts from")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "synthetic_semisup.jsonl"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(v, s) for v in args.variants.split(",") for s in seeds]
    pretrained = args.pretrained
    if args.pretrain:
        pretrained = pretrain(args.pretrain, args.pretrain_iters)
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda vs: run_one(vs[0], vs[1], args.iters, workdir,
                                                   args.split, pretrained), jobs))
    append_jsonl(args.out, records)
    print(markdown_table(records, ["variant", "seed", "miou_a", "miou_b", "wall_s", "failed"]))
    print()
    summary = []
    for v in args.variants.split(","):
        # Network a is the one CPS and the baseline share; b is CPS's second network.
        vals = [r["miou_a"] for r in records if r["variant"] == v and "miou_a" in r]
        if vals:
            summary.append({"variant": v, "runs": len(vals),
                            "miou_a_mean": statistics.mean(vals),
                            "miou_a_std": statistics.stdev(vals) if len(vals) > 1 else 0.0})
    print(markdown_table(summary, ["variant", "runs", "miou_a_mean", "miou_a_std"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
