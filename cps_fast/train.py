"""``python -m cps_fast.train``: parse, build the Trainer, run, close.

With no arguments it trains CPS on the built-in synthetic dataset (generated on first use)
with a tiny DeepLabv3+, in minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .cli import add_config_args, config_from_args, run_main
from .errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cps_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--iters", type=int, default=None, help="iterations (default: from epochs)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>-<method>-<time>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from CKPT, or from the run directory's last checkpoint; "
                        "'--resume auto' continues if --out has a checkpoint, else starts "
                        "(for requeued cluster jobs)")
    p.add_argument("--path", choices=("eager", "fast"), default=None,
                   help="eager step, or the CUDA-graph fast step (falls back to eager off CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.resume not in (None, "latest", "auto") and cfg.out is None:
        # A checkpoint path given: its run directory is the one to continue.
        cfg = cfg.apply_overrides([f"out={Path(args.resume).resolve().parent.parent}"])
    if args.resume in ("latest", "auto") and cfg.out is None:
        raise ConfigError(f"--resume {'' if args.resume == 'latest' else 'auto '}without a "
                          "checkpoint path needs --out RUN_DIR")
    if cfg.preset == "synthetic" and not args.quiet:
        print("cps_fast: training on the built-in synthetic dataset (a CPU demo that finishes in "
              "minutes); pass --preset voc_r50_1-8 --data-root DIR for the paper's runs")
    from . import distributed
    from .engine.trainer import Trainer  # heavy imports after argument errors are reported
    info, device = distributed.init(cfg.train.device)
    try:
        out = cfg.out or distributed.broadcast_str(
            f"runs/{cfg.preset}-{cfg.train.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        trainer = Trainer(cfg, out, resume=args.resume, dist_info=info, device=device,
                          quiet=args.quiet or not info.is_main)
        final = trainer.run()
        if info.is_main and not args.quiet:
            from .baselines import compare_line
            print(compare_line(cfg, final))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
