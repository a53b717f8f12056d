"""The benchmark scripts' CPU smoke modes run and write well-formed records."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"benchmark", "variant", "preset", "device", "commit", "torch", "triton",
            "median_ms", "spread_ms", "images_per_s", "mfu"}


def test_throughput_quick(tmp_path):
    out = tmp_path / "tp.jsonl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
                        "--quick", "--steps", "1", "--reps", "2",
                        "--variants", "eager_fp32,eager_amp_cl,ddp_ws1,graph_fused", "--out", str(out),
                        "--profile", str(tmp_path / "prof")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["variant"] for x in recs] == ["eager_fp32", "eager_amp_cl", "ddp_ws1", "graph_fused"]
    for rec in recs:
        assert "failed" not in rec, rec.get("failed")
        assert REQUIRED <= set(rec), REQUIRED - set(rec)
        assert rec["device"] == "cpu" and rec["median_ms"] > 0 and rec["flops_per_step"] > 0
    assert "CUDA graphs need a GPU" in recs[-1]["note"]
    assert "| voc | eager_fp32 |" in r.stdout
    # --profile: where the time goes, per phase, with the op tables beside
    for rec in recs:
        ph = rec["phase_ms"]
        assert ph["forward"] > 0 and ph["backward"] > 0 and ph["optimizer"] > 0
        assert sum(ph.values()) < 5 * rec["median_ms"]
        assert "convolution" in (tmp_path / "prof" / f"profile-voc-{rec['variant']}.txt").read_text()
    assert "where the time goes" in r.stdout


def test_gpu_round_script_parses_and_respects_its_budget(tmp_path):
    """The one-call GPU round (benchmarks/gpu_round.sh) is only ever run on a lent GPU:
    check here that it parses and that a spent budget skips every stage in order."""
    script = os.path.join(ROOT, "benchmarks", "gpu_round.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    r = subprocess.run(["bash", script], env=dict(os.environ, OUT=str(tmp_path), BUDGET_S="0"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "round.txt").read_text().splitlines()
    assert log[:4] == ["== build: skipped (budget spent)", "== tests_gpu: skipped (budget spent)",
                       "== voc_ladder: skipped (budget spent)",
                       "== voc_compile: skipped (budget spent)"]
    assert (tmp_path / "commit.txt").exists()
