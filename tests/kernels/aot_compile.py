"""Ahead-of-time compile of every Triton kernel for sm_90 / sm_80, no GPU needed.

Run as a script in a process WITHOUT TRITON_INTERPRET (under the interpreter @triton.jit
yields interpreter functions that cannot be compiled):

    python tests/kernels/aot_compile.py [--arch 90 80] [--out benchmarks/results/kernels_aot.json]

Each kernel module's ``aot_specs()`` lists its kernels with the launch constexprs and
num_warps the launchers use at the real shapes. Registers, spills and local memory come
from ``ptxas -v`` (triton's own ptxas) run on the PTX triton produced; shared memory from
triton's metadata. Exit status 1 on any compile error or register spill.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET for the AOT compile"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cps_fast.kernels import (confusion_matrix, cps_loss, cross_entropy,  # noqa: E402
                              ohem_cross_entropy)

MODULES = (cross_entropy, cps_loss, ohem_cross_entropy, confusion_matrix)


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for ``arch`` (triton >= 3.6 ships two), else its bundled one."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(arch).path
        except TypeError:          # older signature: get_ptxas()
            return get_ptxas().path
    except Exception:
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ast_source(spec):
    fn = spec["fn"]
    sig = dict(spec["signature"])
    for k in spec["constexprs"]:
        sig[k] = "constexpr"
    sig = {k: sig[k] for k in fn.arg_names}            # the kernel's argument order
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in spec["divisible"]}
    return ASTSource(fn=fn, signature=sig, constexprs=dict(spec["constexprs"]), attrs=attrs)


def _ptxas_usage(ptx: str, arch: int) -> dict:
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(arch), f"-arch={sm}", "-v", "-o", os.path.join(d, "k.cubin"), path],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    text = r.stderr + r.stdout
    def num(pat):
        m = re.search(pat, text)
        return int(m.group(1)) if m else 0
    return dict(registers=num(r"Used (\d+) registers"),
                spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"),
                stack_frame=num(r"(\d+) bytes stack frame"),
                ptxas_smem=num(r"(\d+) bytes smem"))


def compile_all(archs, only=None):
    records, failures = [], []
    for mod in MODULES:
        for spec in mod.aot_specs():
            if only and only not in spec["name"]:
                continue
            for arch in archs:
                rec = dict(kernel=spec["name"], module=mod.__name__, arch=f"sm_{arch}",
                           num_warps=spec["num_warps"],
                           constexprs={k: v for k, v in spec["constexprs"].items()})
                t0 = time.time()
                try:
                    target = GPUTarget("cuda", arch, 32)
                    ck = triton.compile(_ast_source(spec), target=target,
                                        options={"num_warps": spec["num_warps"]})
                    rec["shared_bytes"] = int(getattr(ck.metadata, "shared", 0))
                    rec.update(_ptxas_usage(ck.asm["ptx"], arch))
                    if rec["spill_stores"] or rec["spill_loads"]:
                        failures.append(f"{spec['name']} sm_{arch}: register spills "
                                        f"({rec['spill_stores']} B stores, {rec['spill_loads']} B loads)")
                except Exception as e:  # a compile error is a test failure, reported per kernel
                    rec["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
                    failures.append(f"{spec['name']} sm_{arch}: {rec['error']}")
                rec["compile_s"] = round(time.time() - t0, 2)
                records.append(rec)
                print(json.dumps(rec), flush=True)
    return records, failures


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="compile kernels whose name contains this")
    args = ap.parse_args(argv)
    records, failures = compile_all(args.arch, args.only)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(triton=triton.__version__, kernels=records), f, indent=1)
    for msg in failures:
        print("FAIL", msg, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
