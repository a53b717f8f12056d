"""The benchmark scripts' CPU smoke modes run and write well-formed records."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"benchmark", "variant", "preset", "device", "commit", "torch", "triton",
            "median_ms", "spread_ms", "images_per_s", "mfu"}


def _throughput(tmp_path, variants, *extra, env=None):
    out = tmp_path / "tp.jsonl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
                        "--quick", "--steps", "1", "--reps", "2", "--variants", variants,
                        "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert r.returncode == 0, r.stderr
    return r, [json.loads(line) for line in out.read_text().splitlines()]


def test_throughput_quick(tmp_path):
    r, recs = _throughput(tmp_path, "eager_fp32,eager_amp_cl,fused,ddp_ws1,graph_fused",
                          "--profile", str(tmp_path / "prof"))
    assert [x["variant"] for x in recs] == ["eager_fp32", "eager_amp_cl", "fused", "ddp_ws1",
                                            "graph_fused"]
    by = {x["variant"]: x for x in recs}
    for rec in recs:
        assert "failed" not in rec, rec.get("failed")
        assert REQUIRED <= set(rec), REQUIRED - set(rec)
        assert rec["device"] == "cpu" and rec["median_ms"] > 0 and rec["flops_per_step"] > 0
        # what ran: every loss op's resolved backend, the graph, AMP, the extension
        assert set(rec["loss_backend"]) == {"cross_entropy", "cps_loss"}
        assert rec["graph"]["asked"] == (rec["variant"] == "graph_fused")
        assert rec["graph"]["captured"] is False and rec["ext"] in ("cuda", "host-only",
                                                                    "unavailable")
        assert rec["amp_dtype"] == (None if rec["variant"] == "eager_fp32" else "bfloat16")
        assert rec["interleaved"] and rec["reps_done"] == 2 and len(rec["samples_ms"]) == 2
        assert rec["speedup_vs_eager_amp_cl"] == pytest.approx(
            by["eager_amp_cl"]["median_ms"] / rec["median_ms"])
    assert set(by["eager_amp_cl"]["loss_backend"].values()) == {"torch"}
    # the CPU cannot capture a graph: timed eagerly, and said to be a fallback
    assert any("CUDA graphs need a GPU" in f for f in by["graph_fused"]["fallback"])
    assert by["eager_amp_cl"]["fallback"] is None
    if by["fused"]["ext"] != "unavailable":      # auto on the CPU: the extension's host path
        assert set(by["fused"]["loss_backend"].values()) == {"cpp"}
        assert by["fused"]["fallback"] is None
    assert "| voc | eager_fp32 |" in r.stdout
    # --profile: where the time goes, per phase, with the op tables beside
    for rec in recs:
        ph = rec["phase_ms"]
        assert ph["forward"] > 0 and ph["backward"] > 0 and ph["optimizer"] > 0
        assert sum(ph.values()) < 5 * rec["median_ms"]
        assert "convolution" in (tmp_path / "prof" / f"profile-voc-{rec['variant']}.txt").read_text()
    assert "where the time goes" in r.stdout


def test_throughput_records_a_forced_fallback(tmp_path):
    """auto with the extension switched off runs the torch reference on the CPU: timed, and
    recorded as a fallback with the reason, not as the fused variant it claims to be."""
    _, recs = _throughput(tmp_path, "fused", env={"CPS_FAST_DISABLE_EXT": "1"})
    (rec,) = recs
    assert set(rec["loss_backend"].values()) == {"torch"} and rec["ext"] == "unavailable"
    assert rec["median_ms"] > 0 and len(rec["fallback"]) == 2
    assert all(f.startswith("auto -> torch for ") and "CPS_FAST_DISABLE_EXT=1" in f
               for f in rec["fallback"]), rec["fallback"]
    # ... and the GPU round reads it as a failed stage, with the reason
    gpu_round = _import_gpu_round()
    head, problems = gpu_round.read_train_step(recs, recs)
    assert "fused" in head and problems and "fallback: auto -> torch" in problems[0]


def test_a_compile_that_falls_back_fails_the_rounds_stage(tmp_path):
    """compiled_fast whose compilation fails (here: a dynamo backend that does not exist)
    trains on the uncompiled step, and says so: the record's fast_compile carries the status
    and the one-line reason, ``fallback`` lists it, and the GPU round's verdict is a failure
    naming it -- not a slow compiled step."""
    _, recs = _throughput(tmp_path, "compiled_fast", "--compile-backend", "no_such_backend")
    (rec,) = recs
    assert rec["median_ms"] > 0
    fc = rec["fast_compile"]
    assert fc["compiled"] is False and fc["compile_status"] == "fallback"
    assert fc["compile_fallback"].startswith("train.compile=default: compilation failed (")
    assert "no_such_backend" in fc["compile_fallback"]
    assert fc["compile_fallback"] in rec["fallback"]
    gpu_round = _import_gpu_round()
    _, problems = gpu_round.read_train_step(recs, recs)
    assert f"voc compiled_fast: fallback: {fc['compile_fallback']}" in problems
    res = gpu_round.Result(gpu_round.STAGES[4], rc=0)
    assert gpu_round.Round.verdict(None, res, problems).startswith("FAIL: ")


def _import_gpu_round():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "gpu_round", os.path.join(ROOT, "benchmarks", "gpu_round.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_round"] = mod      # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_kernels_and_ops_backends_say_what_ran_and_what_did_not(tmp_path):
    """The OHEM baseline is the sort-based reference; a backend that cannot run is a record
    with the reason, not a silent skip; past the stage deadline ($CPS_FAST_BENCH_DEADLINE)
    the remaining cases are recorded as not measured instead of being cut mid-record."""
    out = tmp_path / "k.jsonl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"),
                        "--quick", "--ops", "ohem_cross_entropy", "--layouts", "nchw",
                        "--variants", "eager", "--out", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    (ohem,) = [x for x in recs if x["benchmark"] == "ohem_cross_entropy"]
    assert "sort-based" in ohem["baseline"] and ohem["median_ms"] > 0
    out = tmp_path / "o.jsonl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ops_backends.py"),
                        "--quick", "--reps", "1", "--ops", "cross_entropy", "--out", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", CPS_FAST_DISABLE_EXT="1"))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {x["variant"] for x in recs} == {"eager", "ext"}
    assert all("disabled by CPS_FAST_DISABLE_EXT=1" in x["error"] for x in recs
               if x["variant"] == "ext")
    out = tmp_path / "late.jsonl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"),
                        "--quick", "--layouts", "nchw", "--out", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1",
                                CPS_FAST_BENCH_DEADLINE=str(time.time())))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    late = [x for x in recs if x["benchmark"] != "ceiling"]
    assert len(late) == 6 and all("not measured" in x["error"] for x in late)
