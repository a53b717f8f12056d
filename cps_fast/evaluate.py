"""``python -m cps_fast.evaluate --checkpoint CKPT``: mIoU and per-class IoU on a split.

Evaluates network a, network b and their ensemble (mean softmax) -- or the ones asked
for -- whole-image or sliding window (crop, stride 2/3, mean logits over the windows), with
optional flip and multi-scale. Every figure is printed with the network it belongs to and
the protocol it was measured with; the headline mIoU is network a's (``eval.select``), as
the official CPS evaluation reports network 1.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .cli import run_main
from .data.datasets import build_splits
from .data.loader import iterate_val
from .engine.evaluator import (ENSEMBLE_RULE, eval_figures, evaluate, figure_label, format_mious,
                               headline, protocol, protocol_str)
from .engine.trainer import resolve_device
from .inference import load_networks
from .metrics import format_iou_table, iou_from_confusion, mean_iou, pixel_accuracy
from .runlog import Progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cps_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a cps_fast checkpoint (best.pt, last.pt)")
    p.add_argument("--data-root", default=None, help="dataset root (default: the training run's)")
    p.add_argument("--val-list", default=None, help="evaluate on this list instead of the val split")
    p.add_argument("--network", choices=("all", "both", "a", "b", "ensemble"), default=None,
                   help="figures to compute: all = a, b and their ensemble (default: the "
                        "run's eval.network)")
    p.add_argument("--select", choices=("a", "b", "ensemble", "max"), default=None,
                   help="the headline figure (default: the run's eval.select, network a)")
    p.add_argument("--mode", choices=("whole", "sliding"), default=None)
    p.add_argument("--crop", type=int, default=None, help="sliding-window size")
    p.add_argument("--flip", action="store_true", help="add horizontally flipped predictions")
    p.add_argument("--scales", default=None, help="comma-separated scales, e.g. 0.75,1,1.25")
    p.add_argument("--max-batch", type=int, default=None,
                   help="network inputs (windows) per forward (memory bound; same numbers)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    items = list(args.overrides)
    for flag, key in ((args.data_root, "data.root"), (args.val_list, "data.val_list"),
                      (args.mode, "eval.mode"), (args.crop, "eval.crop_size"),
                      (args.scales, "eval.scales"), (args.network, "eval.network"),
                      (args.select, "eval.select"), (args.max_batch, "eval.max_batch")):
        if flag is not None:
            items.append(f"{key}={flag}")
    if args.flip:
        items.append("eval.flip=true")
    device = resolve_device(args.device)
    cfg, nets, _ = load_networks(args.checkpoint, device, items)
    splits = build_splits(cfg.data)
    figures = eval_figures(cfg.eval.network, len(nets))
    if cfg.eval.select != "max" and cfg.eval.select not in figures:
        # e.g. --network b: the headline is the first figure asked for
        cfg.eval.select = figures[0]
    val = iterate_val(splits.val, splits.info, cfg.data, max_images=args.max_images,
                      device=device)
    n = len(splits.val) if args.max_images is None else min(args.max_images, len(splits.val))
    bar = Progress(n, desc="eval")
    cms = evaluate(nets, val, cfg.eval, splits.info.num_classes, cfg.data.ignore_index, device,
                   figures=figures, progress=lambda i: bar.update(i))
    bar.close()
    proto = protocol(cfg.eval, figures, n)
    results = {"protocol": proto, "protocol_str": protocol_str(proto)}
    mious = {name: mean_iou(cm) for name, cm in cms.items()}
    head = headline(mious, cfg.eval.select)
    print(f"checkpoint {args.checkpoint}; protocol: {results['protocol_str']}")
    for name, cm in cms.items():
        note = " (the headline mIoU)" if name == head else ""
        rule = f" = {ENSEMBLE_RULE}" if name == "ensemble" else ""
        print(f"\n{figure_label(name)}{rule}{note}:")
        print(format_iou_table(cm, splits.info.class_names))
        results[name] = {"miou": mious[name], "pixel_accuracy": pixel_accuracy(cm),
                         "iou": dict(zip(splits.info.class_names,
                                         [None if v != v else float(v)
                                          for v in iou_from_confusion(cm)]))}
    results.update({f"miou_{k}": v for k, v in mious.items()})
    results.update(miou=mious[head], headline=head)
    print("\n" + format_mious(results, list(cms)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    run_main(main)
