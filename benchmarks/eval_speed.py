"""Evaluation speed: window-by-window vs batched windows, unfused vs fused confusion matrix.

Runs ``cps_fast.engine.evaluator.evaluate`` (network a only) on random images of the
dataset's shape through a randomly initialised DeepLabv3+ and reports images/s for

- ``window_by_window``: one network input per forward (``eval.max_batch=1``), argmax +
  confusion matrix by the eager reference (``torch``): evaluation as it was;
- ``batched``: the windows of several images per forward (``eval.max_batch``, default 16);
- ``batched_fused``: batched, with the fused Triton argmax + confusion matrix (GPU only).

On a GPU: Cityscapes (2 images 1024x2048, sliding 800, stride 2/3, 8 windows an image) and
VOC (16 images 500x375, sliding 512: one padded window an image), ResNet-50, bf16 autocast.
On the CPU (``--quick``, or no CUDA): the tiny model at small shapes, smoke figures only.
Appends one JSON record per variant to benchmarks/results/eval_speed-<device>.jsonl
(DESIGN.md section 9) and prints a Markdown table.

    python benchmarks/eval_speed.py            # GPU
    python benchmarks/eval_speed.py --quick    # CPU smoke figures
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import append_jsonl, device_slug, environment, markdown_table, time_ms  # noqa: E402

from cps_fast import ops  # noqa: E402
from cps_fast.config import EvalConfig, ModelConfig  # noqa: E402
from cps_fast.engine.evaluator import evaluate, inputs_per_image  # noqa: E402
from cps_fast.models import build_model  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
# preset: (classes, images, H, W, crop, model)
GPU_CASES = {"cityscapes": (19, 2, 1024, 2048, 800, "resnet50"),
             "voc": (21, 16, 500, 375, 512, "resnet50")}
CPU_CASES = {"cpu_demo": (6, 3, 96, 128, 64, "tiny")}


def _model(backbone: str, classes: int, device) -> torch.nn.Module:
    kw = {} if backbone != "tiny" else dict(aspp_channels=64, decoder_channels=64,
                                             low_level_channels=16)
    net = build_model(ModelConfig(backbone=backbone, **kw), classes)
    return net.to(device).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke figures at small shapes")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--presets", default=None, help="comma list (default: all of the device)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if on_gpu else "cpu")
    cases = GPU_CASES if on_gpu else CPU_CASES
    if args.presets:
        cases = {k: cases[k] for k in args.presets.split(",")}
    reps = args.reps or (5 if on_gpu else 2)
    amp = torch.bfloat16 if on_gpu else None
    env = environment(device)
    variants = [("window_by_window", 1, "torch"), ("batched", args.max_batch, "torch")]
    if on_gpu and "triton" in ops.available_backends("confusion_matrix", "cuda"):
        variants.append(("batched_fused", args.max_batch, "triton"))
    records = []
    for preset, (c, n, h, w, crop, backbone) in cases.items():
        net = {"a": _model(backbone, c, device)}
        g = torch.Generator().manual_seed(0)
        images = [torch.randn(1, 3, h, w, generator=g).to(device) for _ in range(n)]
        labels = [torch.randint(0, c, (1, h, w), generator=g).to(device) for _ in range(n)]
        for variant, max_batch, backend in variants:
            cfg = EvalConfig(mode="sliding", crop_size=crop, max_batch=max_batch)

            def run():
                return evaluate(net, ((x, y, i) for i, (x, y) in enumerate(zip(images, labels))),
                                cfg, c, 255, device, amp, backend, figures=["a"])
            tm = time_ms(run, device, warmup=1, reps=reps)
            records.append(dict(
                env, benchmark="eval", variant=variant, preset=preset, backbone=backbone,
                images=n, image_hw=[h, w], crop=crop, max_batch=max_batch, cm_backend=backend,
                windows_per_image=inputs_per_image(h, w, cfg),
                amp=str(amp).replace("torch.", "") if amp else None, reps=reps,
                median_ms=tm["median_ms"], spread_ms=tm["spread_ms"],
                images_per_s=n / (tm["median_ms"] * 1e-3), mfu=None))
        base = next(r["median_ms"] for r in records
                    if r["preset"] == preset and r["variant"] == "window_by_window")
        for r in records:
            if r["preset"] == preset:
                r["speedup"] = base / r["median_ms"]
        del net, images, labels
    print(f"\n{env['device']}, torch {env['torch']}, commit {env['commit']}"
          + ("" if on_gpu else " (CPU: smoke figures only)") + "\n")
    print(markdown_table(records, ["preset", "variant", "max_batch", "cm_backend", "median_ms",
                                   "spread_ms", "images_per_s", "speedup"]))
    if not args.no_save:
        out = args.out or RESULTS_DIR / f"eval_speed-{device_slug(env['device'])}.jsonl"
        append_jsonl(str(out), records)
        print(f"\nappended {len(records)} records to {out}")


if __name__ == "__main__":
    main()
