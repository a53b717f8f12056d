"""Per-op backend comparison: eager reference vs Triton vs the compiled extension (cps_fast._C).

On a GPU (default when CUDA is available): the VOC (21 classes, 512x512, 8+8 images) and
Cityscapes (19 classes, 800x800) shapes, fp32 and bf16 logits, forward+backward for the
losses (as in a training step), forward for the confusion matrix. Each variant is timed with
CUDA events (median of repeats after warm-up) and reported as GB/s of the op's ideal traffic
(logits + labels read once, gradients written once) against the measured device copy
bandwidth.

On the CPU (``--quick``, or no CUDA): the host C++ path against eager PyTorch at small shapes;
smoke figures only (DESIGN.md section 6).

Appends one JSON record per measured variant to benchmarks/results/ops_backends-<device>.jsonl
(DESIGN.md section 9) and prints a Markdown table.

    python benchmarks/ops_backends.py            # GPU: VOC + Cityscapes shapes
    python benchmarks/ops_backends.py --quick    # CPU smoke figures
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import (append_jsonl, copy_bandwidth_gbs, device_slug, environment,  # noqa: E402
                     markdown_table, peak_extra_gb, time_ms)

from cps_fast import ops  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"

# (preset, op, shape, extra kwargs)
GPU_CASES = [
    ("voc", "cross_entropy", (8, 21, 512, 512), {}),
    ("voc", "cps_loss", (16, 21, 512, 512), {}),
    ("voc", "confusion_matrix", (8, 21, 512, 512), {}),
    ("cityscapes", "cross_entropy", (8, 19, 800, 800), {}),
    ("cityscapes", "ohem_cross_entropy", (8, 19, 800, 800), {"min_kept": 50000}),
    ("cityscapes", "cps_loss", (16, 19, 800, 800), {}),
    ("cityscapes", "confusion_matrix", (8, 19, 800, 800), {}),
]
CPU_CASES = [
    ("cpu_demo", "cross_entropy", (16, 6, 96, 96), {}),
    ("cpu_demo", "ohem_cross_entropy", (16, 6, 96, 96), {"min_kept": 1250}),  # per image
    ("cpu_demo", "cps_loss", (16, 6, 96, 96), {}),
    ("cpu_demo", "confusion_matrix", (16, 6, 96, 96), {}),
    ("cpu_voc_small", "cross_entropy", (4, 21, 128, 128), {}),
    ("cpu_voc_small", "cps_loss", (4, 21, 128, 128), {}),
    ("cpu_city_small", "ohem_cross_entropy", (2, 19, 160, 160), {"min_kept": 5000}),
]


def _inputs(op, shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, c, h, w = shape
    a = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
    t = torch.randint(0, c, (n, h, w), generator=g)
    t[torch.rand((n, h, w), generator=g) < 0.1] = 255
    t = t.to(device)
    b = (torch.randn(shape, generator=g) * 2).to(dtype).to(device) if op == "cps_loss" else None
    return a, b, t


def _bytes(op, shape, dtype, grad: bool) -> int:
    n, c, h, w = shape
    es = torch.finfo(dtype).bits // 8
    logits = n * c * h * w * es
    labels = n * h * w * 8
    if op == "cps_loss":
        return 2 * logits * (2 if grad else 1)
    if op == "confusion_matrix":
        return logits + labels
    return logits * (2 if grad else 1) + labels


def _make_fn(op, backend, a, b, t, kw, grad):
    if op == "confusion_matrix":
        x = a.detach()
        return lambda: ops.confusion_matrix(x, t, a.shape[1], backend=backend)
    xa = a.detach().requires_grad_(grad)
    xb = b.detach().requires_grad_(grad) if b is not None else None

    def run():
        if op == "cps_loss":
            loss, _ = ops.cps_loss(xa, xb, backend=backend)
        elif op == "ohem_cross_entropy":
            loss = ops.ohem_cross_entropy(xa, t, backend=backend, **kw)
        else:
            loss = ops.cross_entropy(xa, t, backend=backend)
        if grad:
            loss.backward()
            xa.grad = None
            if xb is not None:
                xb.grad = None
        return loss
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke figures at small shapes")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None,
                    help="measure every variant this many times (GPU default 2: noise check)")
    ap.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSONL file (default benchmarks/results/ops_backends-<device>.jsonl)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    on_gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if on_gpu else "cpu")
    cases = GPU_CASES if on_gpu else CPU_CASES
    dtypes = [getattr(torch, d) for d in
              (args.dtypes or ("float32,bfloat16" if on_gpu else "float32")).split(",")]
    reps = args.reps or (20 if on_gpu else 7)
    rounds = args.rounds or (2 if on_gpu else 1)
    env = environment(device)
    copy_gbs = copy_bandwidth_gbs(device, 1 << 30) if on_gpu else None
    variants = [("eager", "torch")] + ([("triton", "triton")] if on_gpu else []) + \
               [("ext", "cuda" if on_gpu else "cpp")]

    records = []
    for preset, op, shape, kw in cases:
        for dtype in dtypes:
            a, b, t = _inputs(op, shape, dtype, device.type)
            grad = op != "confusion_matrix"
            nbytes = _bytes(op, shape, dtype, grad)
            for rnd in range(rounds):
                for variant, backend in variants:
                    if backend != "torch" and backend not in ops.available_backends(op, device.type):
                        if rnd == 0:
                            print(f"skip {op}/{variant}: "
                                  f"{ops._load_errors.get(backend) or 'unavailable'}", file=sys.stderr)
                        continue
                    fn = _make_fn(op, backend, a, b, t, kw, grad)
                    tm = time_ms(fn, device, warmup=3, reps=reps)
                    rec = dict(env, benchmark=op, variant=variant, backend=backend, preset=preset,
                               shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                               kwargs=kw, pass_="fwd_bwd" if grad else "fwd", round=rnd,
                               reps=reps, median_ms=tm["median_ms"], spread_ms=tm["spread_ms"],
                               bytes_model=nbytes,
                               gb_per_s=nbytes / (tm["median_ms"] * 1e-3) / 1e9,
                               copy_gb_per_s=copy_gbs,
                               threads=torch.get_num_threads() if not on_gpu else None,
                               peak_mem_gb=peak_extra_gb(fn, device))
                    rec["pass"] = rec.pop("pass_")
                    if copy_gbs:
                        rec["frac_of_copy"] = rec["gb_per_s"] / copy_gbs
                    records.append(rec)
            del a, b, t

    base = {}
    for r in records:
        key = (r["preset"], r["benchmark"], r["dtype"], r["round"])
        if r["variant"] == "eager":
            base[key] = r["median_ms"]
        r["speedup_vs_eager"] = base.get(key, float("nan")) / r["median_ms"]
    print(f"\n{env['device']}, torch {env['torch']}, commit {env['commit']}"
          + (f", copy {copy_gbs:.0f} GB/s" if copy_gbs else "")
          + ("" if on_gpu else " (CPU: smoke figures only)") + "\n")
    print(markdown_table(records, ["preset", "benchmark", "dtype", "variant", "round",
                                   "median_ms", "spread_ms", "gb_per_s", "speedup_vs_eager"]))
    if not args.no_save:
        out = args.out or RESULTS_DIR / f"ops_backends-{device_slug(env['device'])}.jsonl"
        append_jsonl(str(out), records)
        print(f"\nappended {len(records)} records to {out}")


if __name__ == "__main__":
    main()
