"""The machine and its ceilings: what the GPU round measures first (DESIGN.md section 6).

    python benchmarks/ceilings.py [--quick] [--out FILE]
    python benchmarks/ceilings.py --ext-only [--out FILE]   # the extension's state alone

Appends three JSON records to FILE (default benchmarks/results/ceilings-<device>.jsonl):
``environment`` (device, torch / triton / CUDA versions, commit, the extension's state, the
Triton interpreter flag), ``ceiling``/``copy`` (device-to-device copy, GB/s counting bytes
read and written) and ``ceiling``/``matmul_<dtype>`` (an 8192^3 bf16 matmul, TFLOP/s). Every
kernel's GB/s and the training step's MFU are read against these two. Off the GPU (or with
``--quick``) the sizes are small and the matmul fp32: smoke figures only. ``--ext-only``
appends one ``extension`` record (loads or not, with or without its CUDA part, and why):
the GPU round's verdict on its build stage.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as bc  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke)")
    ap.add_argument("--ext-only", action="store_true",
                    help="only the extension's state (after a build)")
    ap.add_argument("--out", default=None, help="JSON-lines file to append to")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    env = bc.environment(device)
    out = args.out or os.path.join(bc.ROOT, "benchmarks", "results",
                                   f"ceilings-{bc.device_slug(env['device'])}.jsonl")
    if args.ext_only:
        st = bc.ext_status()
        rec = dict(env, benchmark="extension", variant="-", preset="-", **st)
        try:
            import cps_fast._C as C   # the build stamp says which sources it was built from
            rec["build_stamp"] = str(getattr(C, "BUILD_STAMP", ""))
        except Exception:
            pass
        bc.append_jsonl(out, [rec])
        print(f"extension: {st['ext']}" + (f" ({st['ext_reason']})" if st["ext_reason"] else ""))
        return 0 if st["ext"] == "cuda" or device.type == "cpu" else 1
    info = dict(env, benchmark="environment", variant="-", preset="-",
                python=platform.python_version(), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                **bc.ext_status())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sm_count=props.multi_processor_count,
                    memory_gb=props.total_memory / 2 ** 30,
                    capability=f"{props.major}.{props.minor}")
    bc.append_jsonl(out, [info])
    ceil = bc.ceilings(device, quick=args.quick or device.type != "cuda")
    recs = [dict(env, benchmark="ceiling", variant="copy", preset="-",
                 gb_per_s=ceil["copy_gb_per_s"]),
            dict(env, benchmark="ceiling", variant=f"matmul_{ceil['matmul_dtype']}",
                 preset="-", tflops=ceil["matmul_tflops"])]
    bc.append_jsonl(out, recs)
    print(f"{env['device']} · torch {env['torch']} (CUDA {torch.version.cuda}) · triton "
          f"{env['triton']} · commit {env['commit']} · extension {info['ext']}"
          + (f" ({info['ext_reason']})" if info["ext_reason"] else ""))
    print(f"copy {ceil['copy_gb_per_s']:.1f} GB/s · {ceil['matmul_dtype']} matmul "
          f"{ceil['matmul_tflops']:.2f} TFLOP/s"
          + ("  (CPU smoke figures only)" if device.type == "cpu" else ""))
    print(f"records appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
