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
(DESIGN.md section 9), flushed as each is measured (a run cut short keeps what it measured;
$CPS_FAST_BENCH_DEADLINE, set by the GPU round, stops it before a case it cannot finish),
and prints a Markdown table. With ``--rounds N`` the variants take turns round by round. A
backend that cannot run here (the extension missing, or built without its CUDA part, on a
GPU) is not skipped silently: it gets a record with ``error`` and the reason.

    python benchmarks/ops_backends.py            # GPU: VOC + Cityscapes shapes
    python benchmarks/ops_backends.py --quick    # CPU smoke figures
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import (append_jsonl, copy_bandwidth_gbs, device_slug, environment,  # noqa: E402
                     ext_status, markdown_table, peak_extra_gb, seconds_left, time_ms)

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
    ap.add_argument("--ops", default=None, help="comma list of ops to measure (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSONL file (default benchmarks/results/ops_backends-<device>.jsonl)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    on_gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if on_gpu else "cpu")
    cases = GPU_CASES if on_gpu else CPU_CASES
    if args.ops:
        unknown = set(args.ops.split(",")) - set(ops.OPS)
        if unknown:
            ap.error(f"--ops: unknown {', '.join(sorted(unknown))} (known: {', '.join(ops.OPS)})")
        cases = [c for c in cases if c[1] in args.ops.split(",")]
    dtypes = [getattr(torch, d) for d in
              (args.dtypes or ("float32,bfloat16" if on_gpu else "float32")).split(",")]
    reps = args.reps or (20 if on_gpu else 7)
    rounds = args.rounds or (2 if on_gpu else 1)
    env = environment(device)
    copy_gbs = copy_bandwidth_gbs(device, 1 << 30) if on_gpu else None
    variants = [("eager", "torch")] + ([("triton", "triton")] if on_gpu else []) + \
               [("ext", "cuda" if on_gpu else "cpp")]

    out = None if args.no_save else (
        args.out or RESULTS_DIR / f"ops_backends-{device_slug(env['device'])}.jsonl")
    ext = ext_status()
    records, base, case_s = [], {}, 0.0

    def emit(rec):
        if out is not None:
            append_jsonl(str(out), [rec])
        records.append(rec)

    for preset, op, shape, kw in cases:
        for dtype in dtypes:
            common = dict(env, benchmark=op, preset=preset, shape=list(shape),
                          dtype=str(dtype).replace("torch.", ""), kwargs=kw, **ext)
            if seconds_left() < 1.5 * case_s + 5:
                for variant, backend in variants:
                    emit(dict(common, variant=variant, backend=backend,
                              error="not measured: the stage's time ran out"))
                continue
            t_case = time.perf_counter()
            a, b, t = _inputs(op, shape, dtype, device.type)
            grad = op != "confusion_matrix"
            nbytes = _bytes(op, shape, dtype, grad)
            for rnd in range(rounds):
                for variant, backend in variants:
                    rec = dict(common, variant=variant, backend=backend, round=rnd,
                               reps=reps, bytes_model=nbytes, copy_gb_per_s=copy_gbs,
                               threads=torch.get_num_threads() if not on_gpu else None)
                    rec["pass"] = "fwd_bwd" if grad else "fwd"
                    if backend != "torch" and backend not in ops.available_backends(op, device.type):
                        if rnd == 0:
                            why = ops._load_errors.get(backend) or (
                                f"{backend} cannot run {op} on {device.type} tensors "
                                f"(extension: {ext['ext']})")
                            rec["error"] = f"backend {backend} unavailable: {why}"
                            print(f"{op}/{variant}: {rec['error']}", file=sys.stderr)
                            emit(rec)
                        continue
                    fn = _make_fn(op, backend, a, b, t, kw, grad)
                    tm = time_ms(fn, device, warmup=3, reps=reps)
                    rec.update(median_ms=tm["median_ms"], spread_ms=tm["spread_ms"],
                               gb_per_s=nbytes / (tm["median_ms"] * 1e-3) / 1e9,
                               peak_mem_gb=peak_extra_gb(fn, device))
                    if copy_gbs:
                        rec["frac_of_copy"] = rec["gb_per_s"] / copy_gbs
                    key = (preset, op, rec["dtype"], rnd)
                    if variant == "eager":
                        base[key] = rec["median_ms"]
                    if base.get(key):
                        rec["speedup_vs_eager"] = base[key] / rec["median_ms"]
                    emit(rec)
                    print(f"{preset} {op} {rec['dtype']} {variant} round {rnd}: "
                          f"{rec['median_ms']:.3f} ms", file=sys.stderr, flush=True)
            del a, b, t
            case_s = time.perf_counter() - t_case

    print(f"\n{env['device']}, torch {env['torch']}, commit {env['commit']}"
          + (f", copy {copy_gbs:.0f} GB/s" if copy_gbs else "")
          + ("" if on_gpu else " (CPU: smoke figures only)") + "\n")
    print(markdown_table(records, ["preset", "benchmark", "dtype", "variant", "round",
                                   "median_ms", "spread_ms", "gb_per_s", "speedup_vs_eager",
                                   "error"]))
    if out is not None:
        print(f"\nappended {len(records)} records to {out}")


if __name__ == "__main__":
    main()
