"""Does CPS help where unlabeled images matter? Supervised vs CPS vs CPS + CutMix on the
benchmarks built for it (issue 16), with the gates that say whether a benchmark can show it.

    python benchmarks/semisup.py --benchmark synthetic-v2|fashion [--splits 1/16,1/8]
        [--methods supervised,cps,cps-cutmix] [--seeds 0,1,2] [--iters N] [--jobs 2]
        [--gates] [--set KEY=VALUE ...] [--out FILE] [--summary-only] [--write-baselines]

Every run is ``python -m cps_fast.train`` with the benchmark's preset (``synthetic`` on
synthetic-v2, ``fashion`` on the Fashion-MNIST mosaics) and ``--method``; the preset holds
each method's CPS weight and ramp-up. The data partition is the same for every run
(``data.split_seed`` 0); ``train.seed`` varies the initialisation, the data order and the
augmentation, and pairs the runs: network a of a CPS run starts from the same weights as
the supervised run of that seed. Each run is a separate process with one torch thread and
in-process data loading, ``--jobs`` at a time; its record is appended to ``--out`` as soon
as it finishes (nothing is lost if a later run dies), with the wall time, both networks'
final mIoU and per-class IoU on the validation set, their mIoU and pixel accuracy on the
*unlabeled* training images (how good the pseudo-labels are, and gate G3), and the last
logged overlap ratios of the two networks.

``--gates`` adds the supervised runs on every label (split ``1/1``) the gates need:

- G1: supervised on all labels >= 65 mIoU;
- G2: all labels beat 1/16 by >= 10 mIoU;
- G3: the supervised 1/16 model scores >= 50 mIoU on the unlabeled training images;
- G4: >= 500 validation images and >= 3 paired seeds.

``--summary-only`` reads the records already in ``--out`` and prints the tables, the gates
and the per-seed differences again, and redraws the plot (``--plot``, default
``benchmarks/results/semisup_<benchmark>.png``): mIoU of network a against the labeled
fraction, one line per method, mean and spread over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import append_jsonl, commit, markdown_table  # noqa: E402

BENCHMARKS = {"synthetic-v2": "synthetic", "fashion": "fashion"}  # benchmark -> preset
METHODS = ("supervised", "cps", "cps-cutmix")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
GATES = {"G1_all_labels_miou": 65.0, "G2_all_minus_1_16": 10.0, "G3_unlabeled_miou_1_16": 50.0,
         "G4_val_images": 500, "G4_seeds": 3}


# --------------------------------------------------------------------------- one run


def eval_unlabeled(ckpt: str) -> dict:
    """mIoU / pixel accuracy of each network of ``ckpt`` on the run's unlabeled images
    (the same partition the run trained with; their labels exist, the run never saw them)."""
    import torch

    from cps_fast.data.datasets import build_splits
    from cps_fast.data.loader import iterate_val
    from cps_fast.engine.evaluator import evaluate
    from cps_fast.inference import load_networks
    from cps_fast.metrics import iou_from_confusion, mean_iou, pixel_accuracy

    torch.set_num_threads(1)
    device = torch.device("cpu")
    cfg, nets, _ = load_networks(ckpt, device, ["data.num_workers=0"])
    splits = build_splits(cfg.data)
    if not splits.unlabeled:
        return {}
    val = iterate_val(splits.unlabeled, splits.info, cfg.data, device=device)
    cms = evaluate(nets, val, cfg.eval, splits.info.num_classes, cfg.data.ignore_index, device)
    out = {}
    for k, cm in cms.items():
        out[f"unlabeled_miou_{k}"] = mean_iou(cm)
        out[f"unlabeled_pixacc_{k}"] = pixel_accuracy(cm)
        out[f"unlabeled_iou_{k}"] = [None if v != v else float(v) for v in iou_from_confusion(cm)]
    out["num_unlabeled_evaluated"] = len(splits.unlabeled)
    return out


def run_one(benchmark: str, method: str, split: str, seed: int, iters: int, workdir: str,
            extra: list[str]) -> dict:
    tag = f"{method}-{split.replace('/', '-')}-{seed}"
    out = os.path.join(workdir, tag)
    sets = ["train.seed=" + str(seed), "train.threads=1", "data.num_workers=0",
            "eval.every=0", *extra]
    cmd = [sys.executable, "-m", "cps_fast.train", "--preset", BENCHMARKS[benchmark],
           "--method", method, "--split", split, "--iters", str(iters), "--out", out, "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.time() - t0
    rec = {"benchmark": "semisup", "dataset": benchmark, "variant": method, "method": method,
           "split": split, "seed": seed, "iters": iters, "wall_s": round(wall, 1),
           "commit": commit(), "device": "cpu", "threads": 1, "overrides": extra,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if r.returncode != 0:
        rec["failed"] = (r.stderr.strip().splitlines() or ["?"])[-1]
        return rec
    with open(os.path.join(out, "config.json")) as f:
        conf = json.load(f)
    rec.update(cps_weight=conf["loss"]["cps_weight"], cps_rampup=conf["loss"]["cps_rampup"],
               num_labeled=conf["derived"]["num_labeled"],
               num_unlabeled=conf["derived"]["num_unlabeled"], num_val=conf["derived"]["num_val"],
               crop_size=conf["data"]["crop_size"], lr=conf["derived"]["base_lr"])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    last_eval = [x for x in records if x.get("kind") == "eval"][-1]
    for k in ("a", "b"):
        if f"miou_{k}" in last_eval:
            rec[f"miou_{k}"] = last_eval[f"miou_{k}"]
            rec[f"iou_{k}"] = last_eval[f"iou_{k}"]
    train = [x for x in records if x.get("kind") == "train"]
    for key in ("overlap_labeled", "overlap_unlabeled", "sup_a", "cps"):
        if train and train[-1].get(key) is not None:
            rec[f"final_{key}"] = train[-1][key]
    t1 = time.time()
    r2 = subprocess.run([sys.executable, os.path.abspath(__file__), "--eval-unlabeled",
                         os.path.join(out, "checkpoints", "last.pt")],
                        capture_output=True, text=True, cwd=ROOT, env=env)
    if r2.returncode == 0 and r2.stdout.strip():
        rec.update(json.loads(r2.stdout.strip().splitlines()[-1]))
        rec["eval_unlabeled_s"] = round(time.time() - t1, 1)
    elif r2.returncode != 0:
        rec["eval_unlabeled_failed"] = (r2.stderr.strip().splitlines() or ["?"])[-1]
    return rec


# --------------------------------------------------------------------------- summaries


def _mean_std(vals: list) -> tuple:
    return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pct(v):
    return None if v is None else round(100 * v, 2)


def summarize(records: list, benchmark: str) -> dict:
    """Per (split, method): mean / std of network a (and b), per-seed differences to the
    supervised run of the same seed; and the gate figures."""
    recs = [dict(r, setting=" ".join(r.get("overrides") or []) or "preset")
            for r in records if r.get("dataset") == benchmark and "miou_a" in r]
    # The latest record wins for a repeated (method, split, seed, iters, overrides).
    latest = {}
    for r in recs:
        latest[(r["method"], r["split"], r["seed"], r["iters"], r["setting"])] = r
    recs = list(latest.values())
    rows, diffs = [], []
    keys = sorted({(r["split"], r["iters"], r["setting"]) for r in recs},
                  key=lambda k: (k[2] != "preset", k[2], _fraction(k[0]), k[1]))
    for split, iters, setting in keys:
        group = [r for r in recs if r["split"] == split and r["iters"] == iters
                 and r["setting"] == setting]
        sup = {r["seed"]: r for r in group if r["method"] == "supervised"}
        for method in METHODS:
            rs = sorted([r for r in group if r["method"] == method], key=lambda r: r["seed"])
            if not rs:
                continue
            a = [100 * r["miou_a"] for r in rs]
            row = {"split": split, "iters": iters, "setting": setting, "method": method,
                   "seeds": len(rs),
                   "miou_a_mean": _mean_std(a)[0], "miou_a_std": _mean_std(a)[1],
                   "wall_s_mean": statistics.mean(r["wall_s"] for r in rs)}
            b = [100 * r["miou_b"] for r in rs if "miou_b" in r]
            if b:
                row["miou_b_mean"], row["miou_b_std"] = _mean_std(b)
            un = [100 * r["unlabeled_miou_a"] for r in rs if "unlabeled_miou_a" in r]
            if un:
                row["unlabeled_miou_a_mean"] = statistics.mean(un)
            if method != "supervised":
                d = [100 * (r["miou_a"] - sup[r["seed"]]["miou_a"]) for r in rs if r["seed"] in sup]
                if d:
                    row["diff_a_mean"], row["diff_a_min"], row["diff_a_max"] = (
                        statistics.mean(d), min(d), max(d))
                    for r in rs:
                        if r["seed"] in sup:
                            diffs.append({"split": split, "iters": iters, "setting": setting,
                                          "method": method,
                                          "seed": r["seed"], "miou_a": 100 * r["miou_a"],
                                          "supervised_a": 100 * sup[r["seed"]]["miou_a"],
                                          "diff_a": 100 * (r["miou_a"] - sup[r["seed"]]["miou_a"])})
            rows.append(row)
    return {"rows": rows, "diffs": diffs, "gates": gates(recs)}


def _fraction(split: str) -> float:
    if "/" in split:
        n, d = split.split("/")
        return int(n) / int(d)
    return float("inf")


def gates(recs: list) -> dict:
    """G1-G4 from the supervised runs (mean over seeds, per iteration budget and setting)."""
    out = {}
    for iters, setting in sorted({(r["iters"], r["setting"]) for r in recs}):
        sup = [r for r in recs if r["method"] == "supervised" and r["iters"] == iters
               and r["setting"] == setting]
        full = [100 * r["miou_a"] for r in sup if r["split"] == "1/1"]
        s16 = [100 * r["miou_a"] for r in sup if r["split"] == "1/16"]
        u16 = [100 * r["unlabeled_miou_a"] for r in sup
               if r["split"] == "1/16" and "unlabeled_miou_a" in r]
        g = {"iters": iters, "setting": setting}
        if full:
            g["all_labels_miou"] = statistics.mean(full)
            g["G1"] = g["all_labels_miou"] >= GATES["G1_all_labels_miou"]
        if full and s16:
            g["split_1_16_miou"] = statistics.mean(s16)
            g["all_minus_1_16"] = g["all_labels_miou"] - g["split_1_16_miou"]
            g["G2"] = g["all_minus_1_16"] >= GATES["G2_all_minus_1_16"]
        if u16:
            g["unlabeled_miou_1_16"] = statistics.mean(u16)
            g["G3"] = g["unlabeled_miou_1_16"] >= GATES["G3_unlabeled_miou_1_16"]
        val = {r.get("num_val") for r in sup}
        seeds = {r["seed"] for r in sup if r["split"] != "1/1"}
        g["val_images"] = min(v for v in val if v is not None) if val - {None} else None
        g["seeds"] = len(seeds)
        g["G4"] = bool(g["val_images"] and g["val_images"] >= GATES["G4_val_images"]
                       and g["seeds"] >= GATES["G4_seeds"])
        out[f"{iters} {setting}"] = g
    return out


def print_summary(summary: dict) -> None:
    print(markdown_table(summary["rows"], ["split", "iters", "setting", "method", "seeds",
                                           "miou_a_mean",
                                           "miou_a_std", "miou_b_mean", "diff_a_mean",
                                           "diff_a_min", "diff_a_max", "unlabeled_miou_a_mean",
                                           "wall_s_mean"]))
    print()
    if summary["diffs"]:
        print(markdown_table(summary["diffs"], ["split", "iters", "setting", "method", "seed",
                                                "miou_a",
                                                "supervised_a", "diff_a"]))
        print()
    for key, g in summary["gates"].items():
        print(f"gates ({key}): " + json.dumps(g))


def plot(summary: dict, benchmark: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["split"] != "1/1" and r["setting"] == "preset"]
    if not rows:
        return
    iters = max({r["iters"] for r in rows}, key=lambda i: sum(r["iters"] == i for r in rows))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    styles = {"supervised": ("tab:gray", "o"), "cps": ("tab:blue", "s"),
              "cps-cutmix": ("tab:red", "^")}
    splits = sorted({r["split"] for r in rows if r["iters"] == iters}, key=_fraction)
    for method in METHODS:
        pts = [r for r in rows if r["method"] == method and r["iters"] == iters]
        pts.sort(key=lambda r: _fraction(r["split"]))
        if not pts:
            continue
        xs = [_fraction(r["split"]) for r in pts]
        color, marker = styles[method]
        ax.errorbar(xs, [r["miou_a_mean"] for r in pts], yerr=[r["miou_a_std"] for r in pts],
                    color=color, marker=marker, capsize=4, linewidth=1.6,
                    label=f"{method} (network a)")
    full = [r for r in summary["rows"] if r["split"] == "1/1" and r["iters"] == iters
            and r["setting"] == "preset"]
    if full:
        ax.axhline(full[0]["miou_a_mean"], color="black", linestyle="--", linewidth=1,
                   label="supervised, all labels")
    ax.set_xscale("log", base=2)
    ax.set_xticks([_fraction(s) for s in splits])
    ax.set_xticklabels(splits)
    ax.set_xlabel("labeled fraction of the training pool")
    ax.set_ylabel("validation mIoU (%)")
    nseeds = max(r["seeds"] for r in rows)
    ax.set_title(f"{benchmark}: mIoU vs labeled fraction\n({iters} iterations, mean ± std "
                 f"over {nseeds} seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_baselines(records: list, benchmark: str, path: str | None = None) -> list:
    """Record the supervised baselines of the preset's own settings (no overrides) in the
    table ``python -m cps_fast.train`` compares its result with (cps_fast/baselines.json),
    with the CPS results of the same seeds beside them; other datasets' entries are kept."""
    from cps_fast import baselines, presets

    path = path or baselines.TABLE
    recs = [r for r in records if r.get("dataset") == benchmark and "miou_a" in r
            and not r.get("overrides") and r["split"] != "1/1"]
    latest = {}
    for r in recs:
        latest[(r["method"], r["split"], r["seed"], r["iters"])] = r
    entries = []
    for split, iters in sorted({(r["split"], r["iters"]) for r in latest.values()}):
        group = [r for r in latest.values() if r["split"] == split and r["iters"] == iters]
        sup = {str(r["seed"]): r["miou_a"] for r in group if r["method"] == "supervised"}
        if not sup:
            continue
        cfg = presets.get(BENCHMARKS[benchmark], "supervised").apply_overrides(
            [f"data.split={split}", f"train.iters={iters}"])
        entry = {"setting": baselines.setting_of(cfg), "supervised_miou_a": sup,
                 "source": f"benchmarks/results/semisup_{benchmark}.jsonl",
                 "commits": sorted({r["commit"] for r in group})}
        for method in METHODS[1:]:
            got = {str(r["seed"]): r["miou_a"] for r in group if r["method"] == method}
            if got:
                entry[f"{method}_miou_a"] = got
        entries.append(entry)
    table = [e for e in baselines.load_table(path)
             if e.get("setting", {}).get("data.dataset") != _dataset_of(benchmark)]
    with open(path, "w") as f:
        json.dump({"note": "supervised baselines (network a, final mIoU, per train.seed) "
                           "measured by benchmarks/semisup.py; written by its "
                           "--write-baselines, read by cps_fast/baselines.py",
                   "baselines": table + entries}, f, indent=1, sort_keys=True)
        f.write("\n")
    return entries


def _dataset_of(benchmark: str) -> str:
    from cps_fast import presets
    return presets.get(BENCHMARKS[benchmark]).data.dataset


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="synthetic-v2")
    p.add_argument("--splits", default="1/16,1/8")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=None, help="default: the preset's")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--gates", action="store_true",
                   help="also the supervised runs on every label (split 1/1) for the gates")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run (recorded)")
    p.add_argument("--out", default=None,
                   help="records file (default benchmarks/results/semisup_<benchmark>.jsonl)")
    p.add_argument("--plot", default=None,
                   help="plot file (default benchmarks/results/semisup_<benchmark>.png)")
    p.add_argument("--workdir", default=None,
                   help="keep the run directories here (default: a temporary folder)")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--write-baselines", action="store_true",
                   help="record the supervised baselines in cps_fast/baselines.json")
    p.add_argument("--eval-unlabeled", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.eval_unlabeled:
        print(json.dumps(eval_unlabeled(args.eval_unlabeled)))
        return 0
    slug = args.benchmark
    out = args.out or os.path.join(RESULTS, f"semisup_{slug}.jsonl")
    plot_path = args.plot or os.path.join(RESULTS, f"semisup_{slug}.png")
    if not args.summary_only:
        from cps_fast import presets
        iters = args.iters or presets.get(BENCHMARKS[args.benchmark]).train.iters
        seeds = [int(s) for s in args.seeds.split(",")]
        jobs = [(m, sp, s) for sp in args.splits.split(",") for s in seeds
                for m in args.methods.split(",")]
        if args.gates:
            jobs = [("supervised", "1/1", s) for s in seeds] + jobs
        lock = threading.Lock()

        def work(job):
            rec = run_one(args.benchmark, *job, iters, workdir, args.overrides)
            with lock:  # one record as soon as the run is done
                append_jsonl(out, [rec])
                print(f"{rec['method']} {rec['split']} seed {rec['seed']}: "
                      f"a {rec.get('miou_a', float('nan')):.4f} "
                      f"b {rec.get('miou_b', float('nan')):.4f} "
                      f"unlabeled a {rec.get('unlabeled_miou_a', float('nan')):.4f} "
                      f"({rec['wall_s']:.0f} s){' FAILED ' + rec['failed'] if 'failed' in rec else ''}",
                      flush=True)
            return rec

        with tempfile.TemporaryDirectory(prefix="semisup-") as tmp, \
                ThreadPoolExecutor(args.jobs) as pool:
            workdir = args.workdir or tmp
            os.makedirs(workdir, exist_ok=True)
            list(pool.map(work, jobs))
    with open(out) as f:
        records = [json.loads(line) for line in f if line.strip()]
    summary = summarize(records, args.benchmark)
    print_summary(summary)
    plot(summary, args.benchmark, plot_path)
    print(f"plot: {plot_path}")
    if args.write_baselines:
        n = len(write_baselines(records, args.benchmark))
        print(f"{n} baseline setting(s) of {args.benchmark} written to cps_fast/baselines.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
