"""Shared helpers of the benchmark scripts: environment record, timing, peak memory,
the device ceilings, JSON-lines records and the Markdown table (DESIGN.md sections 6, 9).

API
---
``environment(device) -> dict``      device name ("cpu" off the GPU), torch / triton
                                     versions, commit, UTC time
``commit() -> str``                  git's HEAD (+ "-dirty") when this tree is a git
                                     checkout, else $CPS_FAST_COMMIT (the GPU machine gets no
                                     .git), else "unknown"
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
``ext_status() -> dict``             {"ext": "cuda" | "host-only" | "unavailable", "ext_reason"}
``loss_backends(ops_used, asked, device_type) -> dict``
                                     op -> the backend cps_fast.ops actually runs it with
``fallback_from_auto(backends, asked, device_type) -> list[str]``
                                     why "auto" did not get the device's first backend
``seconds_left() -> float``          until $CPS_FAST_BENCH_DEADLINE (epoch seconds; inf unset):
                                     the GPU round's stage limit, so a benchmark can stop
                                     between measurements instead of being killed mid-record
``append_jsonl(path, records)``      appends and flushes record by record
``markdown_table(records, columns) -> str``
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
    """The commit measured: git's, when ROOT is itself a git checkout (not a folder inside
    some other repository), else $CPS_FAST_COMMIT, else "unknown"."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        if top.returncode == 0 and os.path.samefile(top.stdout.strip(), ROOT):
            sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True, check=True,
                                 timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=ROOT, capture_output=True, text=True,
                                   timeout=30).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except Exception:  # no git, no .git, a timeout: the variable below
        pass
    return os.environ.get("CPS_FAST_COMMIT") or "unknown"


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
    """Append records, one JSON object a line, flushed to the OS after each: a benchmark
    killed at any moment leaves every record it finished readable."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
            f.flush()


def seconds_left() -> float:
    """Seconds until $CPS_FAST_BENCH_DEADLINE (epoch seconds), inf when it is unset."""
    raw = os.environ.get("CPS_FAST_BENCH_DEADLINE")
    if not raw:
        return float("inf")
    try:
        return float(raw) - time.time()
    except ValueError:
        raise SystemExit(f"error: CPS_FAST_BENCH_DEADLINE={raw!r}: expected epoch seconds")


def ext_status() -> dict:
    """Whether the compiled extension loads and has its CUDA part (never raises)."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cps_fast import ext
    except Exception as e:  # ImportError with the reason (not built, stale, disabled)
        return {"ext": "unavailable", "ext_reason": str(e).splitlines()[0][:300]}
    if ext.HAS_CUDA:
        return {"ext": "cuda", "ext_reason": None}
    return {"ext": "host-only", "ext_reason": "cps_fast._C was built without its CUDA part"}


def loss_backends(ops_used: Iterable[str], asked: str, device_type: str) -> dict:
    """op -> the backend cps_fast.ops runs it with (``auto`` resolved, as the step sees it)."""
    from cps_fast import ops
    return {op: ops.resolved_backend(op, asked, device_type) for op in ops_used}


def fallback_from_auto(backends: dict, asked: str, device_type: str) -> list:
    """Reasons, one per op, where ``auto`` did not get the device's first-choice backend
    (on the GPU: Triton): such a measurement is not what the variant's name claims."""
    from cps_fast import ops
    if asked != "auto":
        return []
    want = ops.AUTO_ORDER.get(device_type, ("torch",))[0]
    out = []
    for op, got in backends.items():
        if got != want:
            why = ops._load_errors.get(want) or f"{want} cannot run {op} on {device_type}"
            out.append(f"auto -> {got} for {op} ({want} unavailable: {why})")
    return out


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
