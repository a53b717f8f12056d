"""benchmarks/eval_speed.py's CPU smoke mode runs and writes well-formed records."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"benchmark", "variant", "preset", "device", "commit", "torch", "triton",
            "median_ms", "spread_ms", "images_per_s", "max_batch", "windows_per_image"}


def test_eval_speed_quick(tmp_path):
    out = tmp_path / "eval.jsonl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "eval_speed.py"),
                        "--quick", "--reps", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["variant"] for x in recs] == ["window_by_window", "batched"]
    for rec in recs:
        assert REQUIRED <= set(rec), REQUIRED - set(rec)
        assert rec["benchmark"] == "eval" and rec["device"] == "cpu" and rec["median_ms"] > 0
        assert rec["windows_per_image"] == 6
    assert [x["max_batch"] for x in recs] == [1, 16]
    assert "| cpu_demo | batched |" in r.stdout
