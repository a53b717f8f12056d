"""Ahead-of-time compile of every Triton kernel for sm_90 and sm_80 (no GPU needed).

Runs tests/kernels/aot_compile.py in subprocesses without TRITON_INTERPRET (one per
architecture, concurrently) and fails on a compile error or on register spills. The
registers / spills / shared memory per kernel go to ``$CPS_FAST_AOT_RECORD`` when it is set
(``CPS_FAST_AOT_RECORD=benchmarks/results/kernels_aot.json`` refreshes the committed record);
a plain test run writes nothing into the checkout.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("aot_compile.py")
ARCHS = (90, 80)


def test_aot_compile_sm90_sm80_no_spills(tmp_path):
    triton = pytest.importorskip("triton")
    from triton.compiler import ASTSource
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip(f"triton {triton.__version__}: ASTSource predates the constexprs API (>= 3.3)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")     # triton 3.9 warns when unset
    procs = {}
    for arch in ARCHS:
        out = tmp_path / f"aot_sm{arch}.json"
        procs[arch] = (out, subprocess.Popen(
            [sys.executable, str(SCRIPT), "--arch", str(arch), "--out", str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    records, errors = [], []
    for arch, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        if out.exists():
            records += json.loads(out.read_text())["kernels"]
        if proc.returncode != 0:
            errors.append(f"sm_{arch}: exit {proc.returncode}\n{stderr[-4000:]}")
    record = os.environ.get("CPS_FAST_AOT_RECORD")
    if records and record:
        out = Path(record)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(triton=triton.__version__, kernels=records), indent=1) + "\n")
    assert not errors, "\n".join(errors)
    names = {r["kernel"] for r in records}
    assert any(n.startswith("cps_loss_fwd") for n in names)
    assert any(n.startswith("ohem_hist") for n in names)
    assert any(n.startswith("confusion_matrix") for n in names)
    assert all("error" not in r and r["spill_stores"] == 0 and r["spill_loads"] == 0
               for r in records)
