"""Shared command-line plumbing: preset + run file + overrides -> Config, and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import presets
from .config import Config
from .errors import CpsFastError
from .runfile import build_config, command_line_items


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = "synthetic") -> None:
    # --preset defaults to None so that a run file's preset can stand in for it.
    p.set_defaults(default_preset=default_preset)
    p.add_argument("--preset", default=None,
                   help=f"run preset (default: the --config file's, else {default_preset}); "
                        f"one of: {', '.join(sorted(presets.PRESETS))}")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="run file (YAML or JSON) of config keys, nested or dotted, applied on "
                        "top of the preset; a run's config.json repeats that run; the options "
                        "below and --set apply on top of it")
    p.add_argument("--method", choices=("cps", "cps-cutmix", "supervised"), default=None,
                   help="training method (default: the preset's: cps-cutmix for synthetic, "
                        "cps for the others)")
    p.add_argument("--data-root", default=None, help="dataset root directory")
    p.add_argument("--split", default=None,
                   help="labeled partition: 1/16, 1/8, 1/4, 1/2 or a count such as 183 "
                        "(drawn from VOC's 1464 fine images with --set data.labeled_pool=fine, "
                        "as the voc_*_hq* presets do)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=0.02 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = build_config(args.preset, args.method, getattr(args, "config", None),
                       getattr(args, "default_preset", "synthetic"))
    items = command_line_items(args.preset, args.method)
    if args.data_root is not None:
        items.append(f"data.root={args.data_root}")
    if args.split is not None:
        items.append(f"data.split={args.split}")
    if getattr(args, "device", None) is not None:
        items.append(f"train.device={args.device}")
    for key in ("iters", "path"):
        if getattr(args, key, None) is not None:
            items.append(f"train.{key}={getattr(args, key)}")
    if getattr(args, "out", None) is not None:
        items.append(f"out={args.out}")
    return cfg.apply_overrides(items + list(args.overrides))


def run_main(fn: Callable[[], int | None]) -> None:
    """Run an entry point; a CpsFastError becomes ``error: <message>`` and exit status 2."""
    try:
        code = fn()
    except CpsFastError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
