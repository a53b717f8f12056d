"""The GPU round (benchmarks/gpu_round.py) on the CPU, in its dry mode: what $OUT would bring
back from the lent machine -- at most 8 files, none deeper than two folders, names of
letters, digits, '.', '_', '-', each under 16 MiB; one archive holding every stage's log;
a summary listing every stage with its verdict -- after a whole round, after a failed stage,
when the budget runs out midway, and when the round itself is killed."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_round.py")
LEGAL = re.compile(r"^[A-Za-z0-9._-]+$")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_round", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_round"] = mod      # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _cmd(tmp_path, *args):
    return [sys.executable, SCRIPT, "--dry", "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work"), *args]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", CPS_FAST_COMMIT="cafe0123")


def _round(tmp_path, *args, timeout=900):
    r = subprocess.run(_cmd(tmp_path, *args), capture_output=True, text=True, timeout=timeout,
                       env=_env(), cwd=tmp_path)
    return r, tmp_path / "out"


def _what_comes_back(out, stages, finished=True):
    """Check $OUT against the machine's limits; (summary rows by stage, archive names)."""
    files = []
    for base, dirs, names in os.walk(out):
        rel = os.path.relpath(base, out)
        depth = 0 if rel == "." else len(rel.split(os.sep))
        assert depth <= 2, f"{base}: deeper than $OUT/a/b/"
        for n in dirs + names:
            assert LEGAL.match(n), f"illegal name {n!r}"
        files += [os.path.join(base, n) for n in names]
    assert 0 < len(files) <= 8, files
    assert all(os.path.getsize(f) <= 16 * 2 ** 20 for f in files)
    names = sorted(os.path.basename(f) for f in files)
    if finished:
        assert not [n for n in names if n.endswith(".part")], names
        assert set(names) <= {"summary.md", "round.tar.gz", "train_step.jsonl",
                              "kernels.jsonl", "other.jsonl"}, names
    summary = (out / "summary.md").read_text()
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit():
            rows[cells[1]] = dict(rc=cells[2], seconds=cells[3], headline=cells[5],
                                  verdict=cells[6])
    assert list(rows) == stages, (list(rows), stages)
    with tarfile.open(out / "round.tar.gz") as tar:
        archived = tar.getnames()
        logs = {n: tar.extractfile(n).read().decode() for n in archived
                if n.startswith("logs/")}
    return rows, archived, logs, summary


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_whole_dry_round(tmp_path):
    """Every stage's own command, tiny, on the CPU (16 processes that each import torch, two
    of them tracing the compiled fast step; 1.5 to 2.5 min of wall time on a shared, loaded
    2-core machine)."""
    stages = [s.name for s in _module().select(None, False)]
    r, out = _round(tmp_path)
    rows, archived, logs, summary = _what_comes_back(out, stages)
    for i, name in enumerate(stages, 1):
        assert f"logs/{i:02d}_{name}.log" in archived, name
    ran = {k: v for k, v in rows.items() if not v["verdict"].startswith("skipped")}
    needs_dali = {"data_pipeline", "voc_dali"}
    assert set(rows) - set(ran) <= needs_dali   # skipped only where DALI is missing
    # The CPU cannot capture a CUDA graph: that is a fallback, so a failed stage, with why.
    assert r.returncode == 1, r.stdout + r.stderr
    for name in ("voc", "city", "profile"):
        assert rows[name]["verdict"].startswith("FAIL"), rows[name]
        assert "graph_fused: fallback: CUDA graph not captured" in rows[name]["verdict"]
        assert "eager_amp_cl" in rows[name]["headline"]
    for name in ("voc", "city_compiled"):
        assert "compiled_fast: fallback: CUDA graph not captured" in rows[name]["verdict"]
        assert "compiled_fast" in rows[name]["headline"]
    other = _records(out / "other.jsonl")
    ext = [x["ext"] for x in other if x["benchmark"] == "extension"]
    must_pass = ["env", "install", "tests_gpu", "kernels", "tests_gpu_compile", "voc_rest",
                 "compile"] + (["ops_backends"] if ext != ["unavailable"] else [])
    for name in must_pass:
        assert rows[name]["verdict"] == "ok", (name, rows[name], logs)
        assert rows[name]["rc"] == "0"
    assert rows["build"]["headline"] == f"extension: {ext[0]}"
    assert (rows["build"]["verdict"] == "ok") == (ext == ["cuda"])
    assert "skipped" in rows["tests_gpu"]["headline"]
    assert "DRY RUN" in summary and "commit " in summary
    assert "profiles/profile-voc-eager_amp_cl.txt" in archived and "tests_gpu.xml" in archived
    # records in at most three files, each saying what ran
    steps = _records(out / "train_step.jsonl")
    assert {(x["preset"], x["variant"]) for x in steps} >= {
        ("voc", "eager_amp_cl"), ("voc", "fused"), ("voc", "graph_fused"),
        ("city", "eager_amp_cl"), ("city", "graph_fused"), ("voc", "compile_default")}
    for x in steps:
        assert {"loss_backend", "graph", "amp_dtype", "ext", "fallback", "commit"} <= set(x)
    compiled = [x for x in steps if x["variant"] == "compile_default"][0]
    assert compiled["compile_graphs"] >= 1 and compiled["fallback"] is None
    # the compiled fast step right after graph_fused on VOC, and last on Cityscapes: traced
    # (aot_eager in the dry round), checked, and failed only for the graph the CPU lacks
    fast = [x for x in steps if x["variant"] == "compiled_fast"]
    assert [x["preset"] for x in fast] == ["voc", "city"]
    for x in fast:
        assert x["fast_compile"]["compile_status"] == "compiled", x["fast_compile"]
        assert len(x["fallback"]) == 1 and x["fallback"][0].startswith("CUDA graph not captured")
    kern = _records(out / "kernels.jsonl")
    assert any("sort-based" in (x.get("baseline") or "") for x in kern)
    assert {"environment", "ceiling", "extension"} <= {x["benchmark"] for x in other}
    mine = [x for x in steps + kern + other if x["benchmark"] != "data_pipeline"]
    assert {x["commit"] for x in mine} == {steps[0]["commit"]}


def test_a_failed_stage_is_reported_and_the_round_goes_on(tmp_path):
    stages = ["install", "voc", "build"]
    r, out = _round(tmp_path, "--stages", ",".join(stages), "--inject", "voc=fail")
    assert r.returncode == 1
    rows, archived, logs, _ = _what_comes_back(out, stages)
    assert rows["voc"]["verdict"] == "FAIL: exit status 3" and rows["voc"]["rc"] == "3"
    assert "injected failure" in logs["logs/02_voc.log"]
    assert rows["install"]["verdict"] == "ok"
    assert rows["build"]["headline"].startswith("extension: ")   # ran after the failure
    assert {f"logs/0{i}_{n}.log" for i, n in enumerate(stages, 1)} <= set(archived)


def test_the_budget_running_out_midway(tmp_path):
    """A stage that hangs is killed where the budget ends; the stages after it are listed
    as skipped; the round ends inside its budget and everything finished is back."""
    stages = ["install", "voc", "build", "kernels"]
    t0 = time.monotonic()
    r, out = _round(tmp_path, "--budget-s", "30", "--stages", ",".join(stages),
                    "--inject", "voc=sleep")
    took = time.monotonic() - t0
    assert r.returncode == 1
    rows, archived, logs, summary = _what_comes_back(out, stages)
    assert rows["install"]["verdict"] == "ok"
    assert rows["voc"]["verdict"].startswith("FAIL: killed at its limit of ")
    for name in ("build", "kernels"):
        assert rows[name]["verdict"] == "skipped: the round's budget is spent"
        assert rows[name]["rc"] == "-"
    assert {f"logs/0{i}_{n}.log" for i, n in enumerate(stages, 1)} <= set(archived)
    assert took < 30 + 25, took       # the budget, plus the kill's grace and start-up


def test_a_round_killed_mid_stage_leaves_what_it_finished(tmp_path):
    stages = ["install", "voc", "build"]
    proc = subprocess.Popen(_cmd(tmp_path, "--stages", ",".join(stages), "--inject",
                                 "voc=sleep"), env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = tmp_path / "out" / "summary.md"
    log = tmp_path / "work" / "logs" / "02_voc.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.exists() and "injected hang"
                                               in log.read_text()):
        time.sleep(0.5)
    try:
        proc.kill()                      # the driver, as the machine's time limit would
        proc.wait(timeout=30)
    finally:
        m = re.search(r"\[gpu_round\] pid (\d+)", log.read_text()) if log.exists() else None
        if m:                            # the sleeping stage, in its own process group
            try:
                os.killpg(int(m.group(1)), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert m, "the hanging stage never started"
    rows, archived, _, _ = _what_comes_back(tmp_path / "out", stages, finished=False)
    assert rows["install"]["verdict"] == "ok" and "logs/01_install.log" in archived
    assert rows["voc"]["verdict"].startswith("running")
    assert rows["build"]["verdict"] == "not reached"


def test_the_plan_lists_the_order_and_limits():
    r = subprocess.run([sys.executable, SCRIPT, "--list"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    names = [line.split()[1] for line in r.stdout.splitlines()]
    assert names[:9] == ["env", "install", "build", "tests_gpu", "voc", "city", "kernels",
                         "profile", "ops_backends"]
    mod = _module()
    assert sum(s.limit_s for s in mod.STAGES[:3]) < 540   # the build is reached early
    with open(SCRIPT) as f:                               # the header keeps the plan
        head = f.read(6000)
    for s in mod.select(None, True):
        assert re.search(rf"\b{s.name}\b\s+{s.limit_s}\b", head) or s.needs, s.name


def test_verdicts_read_fallbacks_and_failures_as_failures():
    mod = _module()
    ok = dict(benchmark="train_step", preset="voc", variant="eager_amp_cl", median_ms=100.0,
              spread_rel=0.02, fallback=None)
    fast = dict(ok, variant="graph_fused", median_ms=50.0)
    slow = dict(ok, variant="fused", median_ms=90.0, fallback=[
        "auto -> torch for cps_loss (triton unavailable: ImportError: no triton)"])
    dead = dict(ok, variant="ddp_ws1", failed="RuntimeError: boom")
    del dead["median_ms"]
    head, problems = mod.read_train_step([ok, fast], [ok, fast])
    assert "graph_fused 50 ms (2.00x)" in head and problems == []
    head, problems = mod.read_train_step([slow, dead], [ok, slow, dead])
    assert "fused 90 ms (1.11x)" in head
    assert problems == ["voc fused: fallback: auto -> torch for cps_loss (triton unavailable: "
                        "ImportError: no triton)", "voc ddp_ws1: RuntimeError: boom"]
    res = mod.Result(mod.STAGES[4], rc=0)
    assert mod.Round.verdict(None, res, problems).startswith("FAIL: voc fused: fallback")
    assert mod.Round.verdict(None, res, []) == "ok"
    _, problems = mod.read_build([dict(benchmark="extension", ext="host-only",
                                       ext_reason="built without its CUDA part")])
    assert problems == ["extension host-only: built without its CUDA part"]
