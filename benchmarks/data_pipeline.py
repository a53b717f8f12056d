"""Input-pipeline throughput: DALI GPU, DALI CPU and the PyTorch loader (images/s).

    python benchmarks/data_pipeline.py [--quick] [--variants dali_gpu,dali_cpu,torch]
                                       [--presets voc-512,cityscapes-800] [--threads 4,8,16]

Each variant streams labeled batches (image + label: decode, multi-scale resize, pad, crop,
flip, normalise) of one preset through its ``TrainStream``:

- ``voc-512``: VOC-sized JPEGs (about 500 x 375, sizes as in VOC), 512 crops, batch 8;
- ``cityscapes-800``: 2048 x 1024 images (JPEG, or PNG with ``--city-format png``) and
  8-bit label PNGs, 800 crops, batch 8.

The images are generated once into ``--data-dir`` (smooth colour fields, shapes and noise,
so that the JPEGs have realistic sizes) and are read from the page cache: the numbers are
decode + augmentation throughput, not disk throughput. ``--threads`` is the number of CPU
threads each variant gets (DALI ``num_threads`` and host readers; PyTorch DataLoader
workers). The median over ``--reps`` repetitions of ``--iters`` batches is reported, after
``--warmup`` batches; the spread is max - min over the repetitions.

On a GPU machine without DALI installed (and no registry to install it from), unpack the
DALI wheels for its Python into a folder that travels with the run (here ``/tmp/site``),
then, in the measuring call::

    export PYTHONPATH=/tmp/site:$PYTHONPATH
    python3 -m pytest -q -m gpu tests/data/test_dali.py
    python3 benchmarks/data_pipeline.py --threads 4,8,16 --out $OUT/data_pipeline.jsonl
    python3 benchmarks/data_pipeline.py --presets cityscapes-800 --city-format png \
        --variants dali_gpu,dali_cpu --out $OUT/data_pipeline.jsonl

Appends one JSON record per (preset, variant, threads) to
``benchmarks/results/data_pipeline.jsonl`` (DESIGN.md section 9 fields) and prints a
Markdown table. A CPU figure is a smoke figure only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cps_fast.config import DataConfig  # noqa: E402
from cps_fast.data.datasets import Sample, voc_info  # noqa: E402

PRESETS = {
    # name: (image (h, w) range, crop, batch, image format)
    "voc-512": (((330, 500), (375, 500)), 512, 8, "jpg"),
    "cityscapes-800": (((1024, 1024), (2048, 2048)), 800, 8, "jpg"),
}


# --------------------------------------------------------------------------- data


def _scene(rng, h, w):
    """A plausible-looking image (so JPEG sizes are realistic) and its label."""
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
    lab = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        y1, x1 = y0 + int(rng.integers(8, h // 2)), x0 + int(rng.integers(8, w // 2))
        c = int(rng.integers(1, 19))
        lab[y0:y1, x0:x1] = c
        yy, xx = np.mgrid[y0:min(y1, h), x0:min(x1, w)]
        tex = (np.sin(xx / rng.uniform(2, 9)) * np.cos(yy / rng.uniform(2, 9)))[..., None]
        img[y0:y1, x0:x1] = rng.uniform(0, 255, 3) * (0.6 + 0.4 * tex)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lab


def make_data(root: str, preset: str, n: int, fmt: str, seed: int = 0) -> list:
    (hr, wr), _crop, _b, _f = PRESETS[preset]
    d = os.path.join(root, f"{preset}-{fmt}")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        h, w = int(rng.integers(hr[0], hr[1] + 1)), int(rng.integers(wr[0], wr[1] + 1))
        ip, lp = os.path.join(d, f"{i:04d}.{fmt}"), os.path.join(d, f"{i:04d}_label.png")
        if not (os.path.exists(ip) and os.path.exists(lp)):
            img, lab = _scene(np.random.default_rng([seed, i]), h, w)
            Image.fromarray(img).save(ip + ".tmp", format="JPEG" if fmt == "jpg" else "PNG",
                                      **({"quality": 90} if fmt == "jpg" else {}))
            Image.fromarray(lab, "L").save(lp + ".tmp", format="PNG")
            os.replace(ip + ".tmp", ip)
            os.replace(lp + ".tmp", lp)
        samples.append(Sample(f"{i:04d}", ip, lp))
    return samples


# --------------------------------------------------------------------------- timing


def _stream(variant: str, samples, cfg: DataConfig, threads: int):
    if variant == "torch":
        from cps_fast.data.loader import TrainStream
        return TrainStream(samples, voc_info(), cfg, cfg.batch_size, 0, "labeled", True)
    from cps_fast.data.dali import DaliTrainStream
    return DaliTrainStream(samples, voc_info(), cfg, cfg.batch_size, 0, "labeled", True,
                           device="cuda" if variant == "dali_gpu" else "cpu",
                           num_threads=threads, host_threads=max(1, min(threads, 8)))


def time_variant(variant: str, samples, cfg: DataConfig, threads: int, warmup: int,
                 iters: int, reps: int) -> list:
    s = _stream(variant, samples, cfg, threads)
    gpu = variant == "dali_gpu"
    try:
        for _ in range(warmup):
            next(s)
        if gpu:
            torch.cuda.synchronize()  # host sync: start the clock on an idle device
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                next(s)
            if gpu:
                torch.cuda.synchronize()  # host sync: the batches are really there
            out.append((time.perf_counter() - t0) * 1000.0 / iters)
        return out
    finally:
        s.close()


# --------------------------------------------------------------------------- records


def _versions() -> dict:
    v = {"torch": torch.__version__, "triton": None, "dali": None}
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - not installed here
        pass
    try:
        import nvidia.dali as dali
        v["dali"] = dali.__version__
    except Exception:  # noqa: BLE001
        pass
    return v


def _commit() -> str:
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                           capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cps_fast", "benchmarks"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout.strip()
        if c:
            return c + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        pass
    return os.environ.get("CPS_FAST_COMMIT") or "unknown"   # the GPU machine has no .git


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--variants", default="dali_gpu,dali_cpu,torch")
    ap.add_argument("--presets", default="voc-512,cityscapes-800")
    ap.add_argument("--threads", default=None, help="comma list (default: all CPUs; quick: 2)")
    ap.add_argument("--images", type=int, default=None, help="images per preset (default 64)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--city-format", choices=("jpg", "png"), default="jpg")
    ap.add_argument("--data-dir", default=os.path.join(
        os.environ.get("CPS_FAST_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "cps_fast"), "bench-data"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "data_pipeline.jsonl"))
    a = ap.parse_args(argv)
    q = a.quick
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = [int(t) for t in a.threads.split(",")] if a.threads else [min(2, n_cpu) if q else n_cpu]
    have_cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if have_cuda else "cpu"
    vers, commit = _versions(), _commit()
    records = []
    for preset in a.presets.split(","):
        (_hw, crop, batch, fmt) = PRESETS[preset]
        if preset.startswith("cityscapes"):
            fmt = a.city_format
        batch = a.batch or (2 if q else batch)
        n = a.images or ((3 if preset.startswith("city") else 6) if q else 64)
        samples = make_data(a.data_dir, preset, n, fmt)
        for variant in a.variants.split(","):
            if variant == "dali_gpu" and not have_cuda:
                print(f"[skip] {preset} {variant}: no CUDA device", file=sys.stderr)
                continue
            if variant.startswith("dali") and vers["dali"] is None:
                print(f"[skip] {preset} {variant}: DALI not installed", file=sys.stderr)
                continue
            for th in threads:
                cfg = DataConfig(dataset="voc", crop_size=crop, batch_size=batch,
                                 num_workers=th if variant == "torch" else 0)
                ms = time_variant(variant, samples, cfg, th, a.warmup or (1 if q else 5),
                                  a.iters or (2 if q else 20), a.reps or (2 if q else 5))
                med = statistics.median(ms)
                rec = {
                    "benchmark": "data_pipeline", "variant": variant, "preset": preset,
                    "device": device if variant == "dali_gpu" else "cpu",
                    "gpu_present": device, "commit": commit, **vers,
                    "median_ms": round(med, 3), "spread_ms": round(max(ms) - min(ms), 3),
                    "images_per_s": round(batch * 1000.0 / med, 2),
                    "threads": th, "cpus": n_cpu, "batch": batch, "crop": crop,
                    "image_format": fmt, "images": n, "quick": q,
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                records.append(rec)
                print(f"{preset:15s} {variant:9s} threads={th:<3d} {med:9.1f} ms/batch  "
                      f"{rec['images_per_s']:8.1f} img/s", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    print(f"\n{'Quick smoke (CPU figures are smoke only). ' if q else ''}"
          f"device: {device}; commit {commit}; DALI {vers['dali']}; torch {vers['torch']}\n")
    print("| preset | variant | threads | batch | median ms/batch | spread ms | images/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in records:
        print(f"| {r['preset']} | {r['variant']} | {r['threads']} | {r['batch']} | "
              f"{r['median_ms']:.1f} | {r['spread_ms']:.1f} | {r['images_per_s']:.1f} |")
    print(f"\nappended {len(records)} records to {os.path.relpath(a.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
