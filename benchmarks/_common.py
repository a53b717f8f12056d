"""Shared helpers of the benchmark scripts: environment record, timing, peak memory,
the device ceilings, JSON-lines records and the Markdown table (DESIGN.md sections 6, 9).

API
---
``environment(device) -> dict``      device name ("cpu" off the GPU), torch / triton
                                     versions, commit (+ "-dirty"), UTC time
``commit() -> str``
``time_ms(fn, device, warmup=3, reps=10) -> dict``
                                     median_ms, spread_ms (max - min), samples_ms; CUDA events
                                     on the GPU (one host sync per repetition, outside the
                                     timed region), perf_counter on the CPU
``peak_extra_gb(fn, device) -> float | None``
                                     peak allocated memory during one call of fn above what
                                     was allocated before it (None on the CPU)
``copy_bandwidth_gbs(device, nbytes) -> float``
                                     device-to-device copy, (read + written bytes) / time
``matmul_tflops(device, n, dtype) -> float``
                                     large square matmul (bf16 on the GPU), 2*n^3 / time
``ceilings(device, quick=False) -> dict``   both of the above, measured now
``append_jsonl(path, records)``; ``markdown_table(records, columns) -> str``
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from datetime import datetime, timezone
from typing import Callable, Iterable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return os.environ.get("CPS_FAST_COMMIT", "unknown")


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(device=name, torch=torch.__version__, triton=triton_version, commit=commit(),
                time_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: benchmark bookkeeping only


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3,
            reps: int = 10) -> dict:
    """Median and spread of ``reps`` timed calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # host sync, outside the timed region
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return dict(median_ms=statistics.median(samples), spread_ms=max(samples) - min(samples),
                samples_ms=[round(s, 4) for s in samples])


def peak_extra_gb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 1e9


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy of ``nbytes``: bytes read + bytes written per second."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    return 2 * src.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                  reps: int = 10) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_ms(lambda: a @ b, device, warmup=3, reps=reps)
    return 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e12


def ceilings(device: torch.device, quick: bool = False) -> dict:
    if device.type == "cuda" and not quick:
        return dict(copy_gb_per_s=copy_bandwidth_gbs(device, 1 << 31),
                    matmul_tflops=matmul_tflops(device, 8192, torch.bfloat16),
                    matmul_dtype="bfloat16")
    # CPU smoke: small sizes, fp32 matmul (bf16 matmul on a CPU says nothing useful)
    return dict(copy_gb_per_s=copy_bandwidth_gbs(device, 1 << 26, reps=5),
                matmul_tflops=matmul_tflops(device, 512, torch.float32, reps=5),
                matmul_dtype="float32")


def append_jsonl(path: str, records: Iterable[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(records: Iterable[dict], columns: list[str]) -> str:
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        rows.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(rows)


def device_slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-") or "cpu"
