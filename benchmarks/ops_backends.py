"""Per-op backend comparison: eager reference vs Triton vs the compiled extension (cps_fast._C).

On a GPU (default when CUDA is available): the VOC (21 classes, 512x512, 8+8 images) and
Cityscapes (19 classes, 800x800) shapes, fp32 and bf16 logits, forward+backward for the
losses (as in a training step), forward for the confusion matrix. Each variant is timed with
CUDA events (median of repeats after warm-up) and reported as GB/s of the op's ideal traffic
(logits + labels read once, gradients written once) against the measured device copy
bandwidth.

On the CPU (``--quick``, or no CUDA): the host C++ path against eager PyTorch at small shapes;
smoke figures only (DESIGN.md section 6).

Appends one JSON record per measured variant to benchmarks/results/ops_backends.jsonl
(DESIGN.md section 9) and prints a Markdown table.

    python benchmarks/ops_backends.py            # GPU: VOC + Cityscapes shapes
    python benchmarks/ops_backends.py --quick    # CPU smoke figures
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cps_fast import ops  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ops_backends.jsonl"

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
    ("cpu_demo", "ohem_cross_entropy", (16, 6, 96, 96), {"min_kept": 20000}),
    ("cpu_demo", "cps_loss", (16, 6, 96, 96), {}),
    ("cpu_demo", "confusion_matrix", (16, 6, 96, 96), {}),
    ("cpu_voc_small", "cross_entropy", (4, 21, 128, 128), {}),
    ("cpu_voc_small", "cps_loss", (4, 21, 128, 128), {}),
    ("cpu_city_small", "ohem_cross_entropy", (2, 19, 160, 160), {"min_kept": 5000}),
]


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "cps_fast/ext.py"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except Exception:
        return "unknown"


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


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


def _time_cuda(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return out


def _time_cpu(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _copy_bandwidth(device) -> float | None:
    """Device-to-device copy GB/s (bytes read + written), the ceiling for these ops."""
    if device != "cuda":
        return None
    x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ts = _time_cuda(lambda: y.copy_(x), 20)
    return 2 * x.numel() * 4 / (statistics.median(ts) * 1e-3) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke figures at small shapes")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--dtypes", default=None, help="comma list: float32,bfloat16")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    device = "cuda" if (torch.cuda.is_available() and not args.quick) else "cpu"
    cases = GPU_CASES if device == "cuda" else CPU_CASES
    dtypes = args.dtypes or ("float32,bfloat16" if device == "cuda" else "float32")
    dtypes = [getattr(torch, d) for d in dtypes.split(",")]
    reps = args.reps or (20 if device == "cuda" else 7)
    timer = _time_cuda if device == "cuda" else _time_cpu
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    copy_gbs = _copy_bandwidth(device)
    commit, tv = _commit(), _triton_version()
    ext_backend = "cuda" if device == "cuda" else "cpp"
    variants = [("eager", "torch")]
    if device == "cuda":
        variants.append(("triton", "triton"))
    variants.append(("ext", ext_backend))

    records = []
    for preset, op, shape, kw in cases:
        for dtype in dtypes:
            a, b, t = _inputs(op, shape, dtype, device)
            grad = op != "confusion_matrix"
            nbytes = _bytes(op, shape, dtype, grad)
            for variant, backend in variants:
                if backend != "torch" and backend not in ops.available_backends(op, device):
                    print(f"skip {op}/{variant}: {ops._load_errors.get(backend) or 'unavailable'}",
                          file=sys.stderr)
                    continue
                fn = _make_fn(op, backend, a, b, t, kw, grad)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ts = sorted(timer(fn, reps))
                med = statistics.median(ts)
                lo, hi = ts[len(ts) // 10], ts[-1 - len(ts) // 10]
                rec = {
                    "benchmark": op, "variant": variant, "backend": backend, "preset": preset,
                    "device": dev_name, "commit": commit, "torch": torch.__version__,
                    "triton": tv, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                    "pass": "fwd_bwd" if grad else "fwd", "reps": reps,
                    "median_ms": round(med, 4), "spread_ms": round(hi - lo, 4),
                    "gb_per_s": round(nbytes / (med * 1e-3) / 1e9, 2),
                    "copy_gb_per_s": round(copy_gbs, 1) if copy_gbs else None,
                    "threads": torch.get_num_threads() if device == "cpu" else None,
                    "peak_mem_gb": (round(torch.cuda.max_memory_allocated() / 2**30, 3)
                                    if device == "cuda" else None),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                records.append(rec)
            del a, b, t

    # table: per case, each variant's median and the speed-up of ext over eager
    print(f"\n{dev_name}, torch {torch.__version__}, commit {commit}"
          + (f", copy {copy_gbs:.0f} GB/s" if copy_gbs else "") + "\n")
    print("| preset | op | dtype | variant | median ms | spread ms | GB/s | vs eager |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    base = {}
    for r in records:
        key = (r["preset"], r["benchmark"], r["dtype"])
        if r["variant"] == "eager":
            base[key] = r["median_ms"]
        speed = base.get(key, float("nan")) / r["median_ms"]
        print(f"| {r['preset']} | {r['benchmark']} | {r['dtype']} | {r['variant']} | "
              f"{r['median_ms']:.3f} | {r['spread_ms']:.3f} | {r['gb_per_s']:.1f} | {speed:.2f}x |")
    if not args.no_save:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"\nappended {len(records)} records to {args.out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
