"""The GPU round: one call on a lent GPU machine that always brings its numbers back.

    OUT=/dir python3 benchmarks/gpu_round.py [--budget-s 540] [--dry] [--stages a,b]
                                             [--inject STAGE=fail|sleep] [--full] [--list]
    (benchmarks/gpu_round.sh is the same, for the device call: OUT=$OUT bash benchmarks/gpu_round.sh)

The lent machine gives one command of at most 600 s and brings back at most 8 files from
$OUT (each <= 16 MiB, at most two folders deep, names of letters, digits, '.', '_', '-';
anything else is dropped silently). So the round runs its stages one after the other, most
valuable first, each in its own process group under its own time limit (and never past the
overall budget), and after every stage

  * re-packs its work folder (every stage's log, the profiles, the test reports, the build's
    ptxas summary) into ONE archive, $OUT/round.tar.gz (written beside, then renamed);
  * rewrites $OUT/summary.md: one row per stage -- rc, seconds, the headline numbers and a
    verdict. A fallback is a failure: auto -> torch loss backend, a CUDA graph not captured,
    a torch.compile that compiled nothing, an extension without its CUDA part; so is a
    failed test, a failed record, a timeout;
  * leaves the JSON-lines records where the benchmarks append them one by one: at most
    three files, $OUT/train_step.jsonl, $OUT/kernels.jsonl, $OUT/other.jsonl.

$OUT therefore never holds more than 7 files (5 + a transient .part of the archive and of
the summary), and a round killed at any moment leaves every finished stage readable.

Order and limits inside the default 540 s budget (a 600 s device call, with margin for the
machine's own overhead). Expected times are estimates from the CPU build and from the sizes
involved -- correct them from the first round's summary. The compiled fast step
(compiled_fast: an Inductor compile of both R50 networks, forward and backward, run twice
each in one graph, estimated 60-120 s on the H200 machine's 16 cores, plus its dry-run
check) runs right after graph_fused on VOC, in stage 5; on Cityscapes it would push the
kernels and profile stages out of the budget, so it runs last (stage 13,
CITY_COMPILE_LADDER). Stages 1-10 expect ~465 s of the 530 s the budget leaves to the
stages, so in one default call voc_rest probably fits, compile and city_compiled only if the
estimates above them were pessimistic (a stage cut at the budget's end, or skipped with
under 20 s left, says so in the summary); a second call with
--stages env,install,build,voc_rest,compile,city_compiled runs them:

  #  stage              limit  expect  what
  1  env                  30     10   nvidia-smi, versions, copy GB/s, bf16 matmul TFLOP/s
  2  install              60     15   pip install -e . with CPS_FAST_SKIP_EXT=1: cps_fast and
                                      cps_fast.kernels import whatever the build does next
  3  build               120     45   the extension for sm_90 (nvcc), its own stage; the
                                      verdict fails unless _C loads with its CUDA part
  4  tests_gpu           120     80   pytest -m gpu (per-test timeout), Inductor tests
                                      excluded (stage 10)
  5  voc                 210    150   train step, VOC: eager_amp_cl, fused, graph_fused,
                                      compiled_fast (its Inductor compile: ~100 of the 150 s)
  6  city                 75     50   train step, Cityscapes: eager_amp_cl, graph_fused
  7  kernels              45     30   loss kernels: eager reference (OHEM: the sort-based
                                      one) vs Triton, one round
  8  profile              45     30   per-phase profile of eager_amp_cl and graph_fused
                                      (a separate process: the profiler never touches 5-6)
  9  ops_backends         40     25   eager vs Triton vs the CUDA extension, per op
 10  tests_gpu_compile    60     30   the gpu tests that run Inductor
 11  voc_rest             60     40   the other ladder rungs: eager_fp32, eager_amp, ddp_ws1
 12  compile             120     90   torch.compile default and reduce-overhead on VOC
 13  city_compiled       210    150   train step, Cityscapes: eager_amp_cl, compiled_fast
 14  voc_max_autotune    240          only with --full
     (data_pipeline, voc_dali: only where DALI is installed; the lent machine has none)

A stage killed at its limit brings back none of its train-step records (throughput.py
writes a preset's records after timing all of its variants), hence the generous limits of
the two stages with a compile in them. A compile that falls back (it failed, or the dry-run
check found its gradients wrong) is recorded in ``fallback`` with the reason, which fails
the stage's verdict like any fallback.

The ladders are the lists VOC_LADDER, CITY_LADDER, REST_LADDER, COMPILE_LADDER and
CITY_COMPILE_LADDER below: adding a variant of benchmarks/throughput.py to the round is
adding its name there.

--dry runs every stage's command on the CPU in seconds (tiny shapes, the benchmarks'
--quick, no pip, no build: the install and build stages only check what is installed), for
the tests of this script (tests/test_gpu_round.py). --inject STAGE=fail|sleep replaces a
stage's command by one that fails or outlasts its limit (also $CPS_FAST_ROUND_INJECT).
The commit recorded is git's where the tree is a checkout, else $CPS_FAST_COMMIT: pass it
in the device call (the machine gets no .git).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FILES = {"train_step": "train_step.jsonl", "kernels": "kernels.jsonl",
                "other": "other.jsonl"}
ARCHIVE = "round.tar.gz"
SUMMARY = "summary.md"
MAX_FILE_BYTES = 15 * 2 ** 20          # the machine returns files up to 16 MiB
PACK_RESERVE_S = 10                     # kept back from the budget for the last packing
MIN_STAGE_S = 20                        # a stage is not started with less than this left
KILL_GRACE_S = 5                        # SIGTERM, then SIGKILL this much later
DEADLINE_MARGIN_S = 8                   # benchmarks stop this long before their limit

# The round's ladders (benchmarks/throughput.py variant names), most valuable first.
VOC_LADDER = ["eager_amp_cl", "fused", "graph_fused", "compiled_fast"]
CITY_LADDER = ["eager_amp_cl", "graph_fused"]
REST_LADDER = ["eager_fp32", "eager_amp", "ddp_ws1"]
COMPILE_LADDER = ["compile_default", "compile_reduce_overhead"]
# Cityscapes' compiled fast step, with its own baseline for an interleaved speed-up: last,
# its compile would push the kernels and profile stages out of the budget (header)
CITY_COMPILE_LADDER = ["eager_amp_cl", "compiled_fast"]
PROFILE_VARIANTS = ["eager_amp_cl", "graph_fused"]
# pytest -k expression of the gpu tests that run Inductor (long compiles): a later stage
INDUCTOR_TESTS = "inductor or compile"


@dataclasses.dataclass
class Stage:
    name: str
    limit_s: int
    cmd: Callable[["Round"], list]          # the real command
    dry: Callable[["Round"], list]          # the CPU dry-run command
    records: Optional[str] = None           # which record file it appends to
    kind: str = "generic"                   # how its headline and verdict are read
    needs: Optional[str] = None             # a Python module it needs (else skipped)
    full_only: bool = False                 # only with --full
    env: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    stage: Stage
    status: str = "pending"    # pending, running, done, skipped
    rc: Optional[int] = None
    seconds: float = 0.0
    limit: float = 0.0
    timed_out: bool = False
    headline: str = ""
    verdict: str = ""
    started: float = 0.0
    log: str = ""


# ----------------------------------------------------------------------------- stages
def _py(*args) -> list:
    return [sys.executable, "-u", *args]


def _bench(script: str, *args) -> list:
    return _py(os.path.join("benchmarks", script), *args)


def _tp(r: "Round", presets: str, variants: list, out: str, *extra) -> list:
    return _bench("throughput.py", "--presets", presets, "--variants", ",".join(variants),
                  "--out", r.records(out), *extra)


def _tp_dry(r: "Round", presets: str, variants: list, out: str, *extra) -> list:
    return _tp(r, presets, variants, out, "--quick", "--steps", "1", "--reps", "2", *extra)


# The dry round traces compiled_fast with dynamo + AOTAutograd, run op by op: Inductor's
# C++ compile of the tiny model costs minutes on the CPU (and there it would be rejected by
# the dry-run check anyway, see engine/compiled.py)
_DRY_FAST_COMPILE = ("--compile-backend", "aot_eager")


def _pytest(r: "Round", name: str, kexpr: str, dry: bool) -> list:
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "-m", "gpu",
            "-k", kexpr, "--junitxml", os.path.join(r.work, f"{name}.xml")]
    if dry:   # collection and clean skips only: the CPU has no GPU
        return _py(*args, "tests/csrc/test_ext_gpu.py", "tests/kernels/test_graph_capture.py")
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["--timeout", "90"]        # one hung test must not eat the stage
    if importlib.util.find_spec("xdist") is not None:
        args += ["-n", "4"]                # Triton's JIT compiles in parallel (16 cores)
    return _py(*args)


def _install(r: "Round") -> list:
    py = shlex.quote(sys.executable)
    return ["bash", "-c",
            f"CPS_FAST_SKIP_EXT=1 {py} -m pip install --no-build-isolation --no-deps -e . "
            f"&& {py} -c 'import cps_fast.kernels, cps_fast.ops; "
            f"print(\"cps_fast.kernels imports\")'"]


def _build(r: "Round") -> list:
    # ';' not '&&': the extension's state is recorded whatever the build did
    py = shlex.quote(sys.executable)
    return ["bash", "-c",
            f"CPS_FAST_CUDA=1 CPS_FAST_CUDA_ARCHS=90 CPS_FAST_BUILD_JOBS=16 "
            f"{py} -m pip install -v --no-build-isolation --no-deps -e . ; "
            f"cp build/ptxas_summary.txt {shlex.quote(r.work)}/ 2>/dev/null; "
            f"{py} -u benchmarks/ceilings.py --ext-only --out {shlex.quote(r.records('other'))}"]


def _env_stage(r: "Round") -> list:
    return ["bash", "-c", f"nvidia-smi; {shlex.quote(sys.executable)} -u benchmarks/ceilings.py "
                          f"--out {shlex.quote(r.records('other'))}"]


STAGES = [
    Stage("env", 30, _env_stage,
          lambda r: _bench("ceilings.py", "--quick", "--out", r.records("other")),
          records="other", kind="env"),
    Stage("install", 60, _install,
          lambda r: _py("-c", "import cps_fast.kernels, cps_fast.ops; "
                              "print('cps_fast.kernels imports (dry: not reinstalled)')")),
    Stage("build", 120, _build,
          lambda r: _bench("ceilings.py", "--ext-only", "--out", r.records("other")),
          records="other", kind="build"),
    Stage("tests_gpu", 120, lambda r: _pytest(r, "tests_gpu", f"not ({INDUCTOR_TESTS})", False),
          lambda r: _pytest(r, "tests_gpu", f"not ({INDUCTOR_TESTS})", True),
          kind="tests", env={"CPS_FAST_REQUIRE_EXT": "1"}),
    Stage("voc", 210, lambda r: _tp(r, "voc", VOC_LADDER, "train_step", "--steps", "10"),
          lambda r: _tp_dry(r, "voc", VOC_LADDER, "train_step", *_DRY_FAST_COMPILE),
          records="train_step", kind="train_step"),
    Stage("city", 75, lambda r: _tp(r, "city", CITY_LADDER, "train_step", "--steps", "8"),
          lambda r: _tp_dry(r, "city", CITY_LADDER, "train_step"),
          records="train_step", kind="train_step"),
    Stage("kernels", 45,
          lambda r: _bench("kernels.py", "--variants", "eager,triton", "--rounds", "1",
                           "--out", r.records("kernels")),
          lambda r: _bench("kernels.py", "--quick", "--variants", "eager,triton", "--rounds",
                           "1", "--layouts", "nchw", "--out", r.records("kernels")),
          records="kernels", kind="kernels"),
    Stage("profile", 45,
          lambda r: _tp(r, "voc", PROFILE_VARIANTS, "other", "--steps", "5", "--reps", "1",
                        "--profile", os.path.join(r.work, "profiles")),
          lambda r: _tp(r, "voc", PROFILE_VARIANTS, "other", "--quick", "--steps", "1",
                        "--reps", "1", "--profile", os.path.join(r.work, "profiles")),
          records="other", kind="profile"),
    Stage("ops_backends", 40,
          lambda r: _bench("ops_backends.py", "--rounds", "1", "--out", r.records("other")),
          lambda r: _bench("ops_backends.py", "--quick", "--reps", "2", "--ops",
                           "cross_entropy,cps_loss", "--out", r.records("other")),
          records="other", kind="ops"),
    Stage("tests_gpu_compile", 60, lambda r: _pytest(r, "tests_gpu_compile", INDUCTOR_TESTS,
                                                     False),
          lambda r: _pytest(r, "tests_gpu_compile", INDUCTOR_TESTS, True), kind="tests",
          env={"CPS_FAST_REQUIRE_EXT": "1"}),
    Stage("voc_rest", 60, lambda r: _tp(r, "voc", REST_LADDER, "train_step", "--steps", "10"),
          lambda r: _tp_dry(r, "voc", REST_LADDER[:1], "train_step"),
          records="train_step", kind="train_step"),
    Stage("compile", 120, lambda r: _tp(r, "voc", COMPILE_LADDER, "train_step", "--steps", "10"),
          lambda r: _tp_dry(r, "voc", COMPILE_LADDER[:1], "train_step", "--compile-backend",
                            "eager"),
          records="train_step", kind="train_step"),
    Stage("city_compiled", 210,
          lambda r: _tp(r, "city", CITY_COMPILE_LADDER, "train_step", "--steps", "8"),
          lambda r: _tp_dry(r, "city", CITY_COMPILE_LADDER, "train_step", *_DRY_FAST_COMPILE),
          records="train_step", kind="train_step"),
    Stage("voc_max_autotune", 240,
          lambda r: _tp(r, "voc", ["compile_max_autotune"], "train_step", "--steps", "10"),
          lambda r: _tp_dry(r, "voc", ["compile_max_autotune"], "train_step",
                            "--compile-backend", "eager"),
          records="train_step", kind="train_step", full_only=True),
    Stage("data_pipeline", 90,
          lambda r: _bench("data_pipeline.py", "--threads", "4,8,16", "--out",
                           r.records("other")),
          lambda r: _bench("data_pipeline.py", "--quick", "--out", r.records("other")),
          records="other", needs="nvidia.dali"),
    Stage("voc_dali", 120,
          lambda r: _tp(r, "voc", ["fused", "graph_fused"], "train_step", "--data", "dali",
                        "--steps", "10"),
          lambda r: _tp_dry(r, "voc", ["fused"], "train_step", "--data", "dali"),
          records="train_step", kind="train_step", needs="nvidia.dali"),
]


# ----------------------------------------------------------------------------- records
def read_records(path: str, start: int = 0) -> list:
    """JSON records from line ``start`` on (a line cut by a kill is ignored)."""
    out = []
    try:
        with open(path) as f:
            for i, line in enumerate(f):
                if i < start or not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return out


def count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _f(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def read_train_step(recs: list, all_recs: list) -> tuple[str, list]:
    """Headline (ms/step and speed-up against eager_amp_cl per variant) and problems."""
    base = {}
    for r in all_recs:          # the baseline may come from an earlier stage
        if r.get("variant") == "eager_amp_cl" and r.get("median_ms"):
            base[r["preset"]] = r["median_ms"]
    parts, problems = {}, []
    for r in recs:
        if r.get("benchmark") != "train_step":
            continue
        name = f"{r['variant']}"
        if r.get("failed"):
            problems.append(f"{r['preset']} {name}: {r['failed']}")
            continue
        ms = r.get("median_ms")
        txt = f"{name} {_f(ms)} ms"
        if base.get(r["preset"]) and ms and r["variant"] != "eager_amp_cl":
            txt += f" ({base[r['preset']] / ms:.2f}x)"
        if r.get("spread_rel") is not None:
            txt += f" ±{100 * r['spread_rel']:.0f}%"
        parts.setdefault(r["preset"], []).append(txt)
        for why in r.get("fallback") or []:
            problems.append(f"{r['preset']} {name}: fallback: {why}")
        if r.get("profile_failed"):
            problems.append(f"{r['preset']} {name}: profile failed: {r['profile_failed']}")
    head = " · ".join(f"{p}: " + ", ".join(v) for p, v in parts.items())
    return head, problems


def read_profile(recs: list) -> tuple[str, list]:
    parts, problems = [], []
    for r in recs:
        if r.get("benchmark") != "train_step":
            continue
        if r.get("failed") or r.get("profile_failed"):
            problems.append(f"{r['variant']}: {r.get('failed') or r.get('profile_failed')}")
            continue
        ph = r.get("phase_ms") or {}
        busy = r.get("device_busy_frac")
        parts.append(f"{r['variant']} fwd {_f(ph.get('forward'))} / bwd "
                     f"{_f(ph.get('backward'))} / opt {_f(ph.get('optimizer'))} ms"
                     + (f", busy {busy:.2f}" if busy is not None else ""))
        for why in r.get("fallback") or []:
            problems.append(f"{r['variant']}: fallback: {why}")
    return "; ".join(parts), problems


def read_kernels(recs: list, key: str = "triton") -> tuple[str, list]:
    speed, problems = {}, []
    for r in recs:
        if r.get("benchmark") in ("ceiling", "environment"):
            continue
        if r.get("error"):
            problems.append(f"{r['benchmark']} {r.get('preset')} {r.get('layout', '')} "
                            f"{r['variant']}: {r['error']}")
            continue
        if r.get("variant") == key and r.get("speedup_vs_eager"):
            speed.setdefault(r["benchmark"], []).append(r["speedup_vs_eager"])
    head = ", ".join(f"{op} {_median(v):.2f}x" for op, v in speed.items())
    return (f"{key} vs eager (median): {head}" if head else ""), problems


def read_env(recs: list) -> tuple[str, list]:
    head, problems = [], []
    for r in recs:
        if r.get("benchmark") == "environment":
            head.append(f"{r.get('device')} · torch {r.get('torch')} · triton {r.get('triton')}")
        elif r.get("variant") == "copy":
            head.append(f"copy {_f(r.get('gb_per_s'), 4)} GB/s")
        elif str(r.get("variant", "")).startswith("matmul"):
            head.append(f"{r['variant'][7:]} matmul {_f(r.get('tflops'), 4)} TFLOP/s")
    return " · ".join(head), problems


def read_build(recs: list) -> tuple[str, list]:
    ext = [r for r in recs if r.get("benchmark") == "extension"]
    if not ext:
        return "", ["no extension record (the check did not run)"]
    r = ext[-1]
    head = f"extension: {r.get('ext')}"
    if r.get("ext") != "cuda":
        return head, [f"extension {r.get('ext')}: {r.get('ext_reason')}"]
    return head, []


def read_junit(path: str) -> tuple[str, list]:
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(path).getroot()
    except Exception:
        return "", ["no test report (pytest did not finish)"]
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                            "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    head = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    problems = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
            problems.append(f"{case.get('classname')}::{case.get('name')}: {msg}")
    return head, problems


# ----------------------------------------------------------------------------- the round
class Round:
    def __init__(self, out: str, work: str, budget_s: float, dry: bool, inject: dict,
                 commit: str):
        self.out, self.work, self.budget_s, self.dry = out, work, budget_s, dry
        self.inject, self.commit = inject, commit
        self.t0 = time.monotonic()
        self.started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.results: list[Result] = []
        self.shim: Optional[str] = None
        os.makedirs(out, exist_ok=True)
        os.makedirs(os.path.join(work, "logs"), exist_ok=True)

    def records(self, key: str) -> str:
        return os.path.join(self.out, RECORD_FILES[key])

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed() - PACK_RESERVE_S

    # ------------------------------------------------------------------ one stage
    def command(self, st: Stage) -> list:
        what = self.inject.get(st.name)
        if what == "fail":
            return _py("-c", f"import sys; print('{st.name}: injected failure'); sys.exit(3)")
        if what == "sleep":
            return _py("-c", f"import time; print('{st.name}: injected hang', flush=True); "
                             "time.sleep(3600)")
        if what is not None:
            raise SystemExit(f"error: --inject {st.name}={what}: expected fail or sleep")
        return (st.dry if self.dry else st.cmd)(self)

    def run_stage(self, i: int, res: Result) -> None:
        st = res.stage
        res.limit = min(st.limit_s, self.left())
        res.status, res.started = "running", self.elapsed()
        res.log = os.path.join("logs", f"{i:02d}_{st.name}.log")
        self.write_summary()
        env = dict(os.environ, PYTHONUNBUFFERED="1", CPS_FAST_COMMIT=self.commit,
                   CPS_FAST_BENCH_DEADLINE=str(time.time() + res.limit - DEADLINE_MARGIN_S),
                   **st.env)
        if not self.dry:
            env["TRITON_INTERPRET"] = "0"      # tests/conftest.py turns it on by default
        else:
            # one thread: a CI machine's cores are shared, and OpenMP threads that outnumber
            # the free cores spin (a tiny training step 10-20x slower)
            env.setdefault("OMP_NUM_THREADS", "1")
        if self.shim:
            env["PYTHONPATH"] = os.pathsep.join([self.shim] + [p for p in [
                env.get("PYTHONPATH")] if p])
        before = count_lines(self.records(st.records)) if st.records else 0
        t = time.monotonic()
        with open(os.path.join(self.work, res.log), "w") as log:
            try:
                cmd = self.command(st)
            except SystemExit:
                raise
            log.write(f"$ {' '.join(map(str, cmd))}\n(limit {res.limit:.0f} s)\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            log.write(f"[gpu_round] pid {proc.pid}\n")   # its own process group
            log.flush()
            try:
                res.rc = proc.wait(timeout=max(1.0, res.limit))
            except subprocess.TimeoutExpired:
                res.timed_out = True
                _kill(proc)
                res.rc = proc.returncode
                log.write(f"\n[gpu_round] killed at its limit of {res.limit:.0f} s\n")
        res.seconds = time.monotonic() - t
        res.status = "done"
        recs = read_records(self.records(st.records), before) if st.records else []
        all_recs = read_records(self.records(st.records)) if st.records else []
        res.headline, problems = self.read(res, recs, all_recs)
        res.verdict = self.verdict(res, problems)
        if st.name == "install" and res.rc != 0 and not self.dry:
            self.shim = make_shim(self.work)   # the rest runs from the tree as it is
            res.verdict += "; later stages import cps_fast from the tree (PYTHONPATH shim)"
        elif st.name == "build" and self.shim:
            self.shim = make_shim(self.work)   # pick up the _C the build left in the tree

    def read(self, res: Result, recs: list, all_recs: list) -> tuple[str, list]:
        st = res.stage
        if st.kind == "train_step":
            return read_train_step(recs, all_recs)
        if st.kind == "profile":
            return read_profile(recs)
        if st.kind == "kernels":
            return read_kernels(recs, "triton")
        if st.kind == "ops":
            return read_kernels(recs, "ext")
        if st.kind == "env":
            return read_env(recs)
        if st.kind == "build":
            return read_build(recs)
        if st.kind == "tests":
            return read_junit(os.path.join(self.work, f"{st.name}.xml"))
        return _last_line(os.path.join(self.work, res.log)), []

    def verdict(self, res: Result, problems: list) -> str:
        if res.timed_out:
            problems = [f"killed at its limit of {res.limit:.0f} s"] + problems
        elif res.rc not in (0, None) and not (res.stage.kind == "tests" and res.rc == 5):
            problems = [f"exit status {res.rc}"] + problems
        if not problems:
            return "ok"
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more"
                                            if len(problems) > 4 else "")
        return "FAIL: " + shown.replace("|", "/").replace("\n", " ")

    # ------------------------------------------------------------------ the whole round
    def run(self, stages: list) -> int:
        self.results = [Result(st) for st in stages]
        self.write_summary()
        for i, res in enumerate(self.results, 1):
            st = res.stage
            if st.needs and not _importable(st.needs):
                self.skip(i, res, f"skipped: needs {st.needs}")
            elif self.left() < (1 if self.dry else MIN_STAGE_S):
                self.skip(i, res, "skipped: the round's budget is spent")
            else:
                self.run_stage(i, res)
            print(f"[gpu_round] {i:2d} {st.name}: {res.verdict} ({res.seconds:.0f} s)"
                  + (f" -- {res.headline}" if res.headline else ""), flush=True)
            self.write_summary()
            self.pack()
        failed = [r for r in self.results if r.verdict.startswith("FAIL")]
        return 1 if failed else 0

    def skip(self, i: int, res: Result, why: str) -> None:
        res.status, res.verdict = "skipped", why
        res.log = os.path.join("logs", f"{i:02d}_{res.stage.name}.log")
        with open(os.path.join(self.work, res.log), "w") as f:
            f.write(f"{why} ({self.left():.0f} s left of the budget at {self.elapsed():.0f} s)\n")

    # ------------------------------------------------------------------ what comes back
    def write_summary(self) -> None:
        done = [r for r in self.results if r.status == "done"]
        bad = [r for r in done if r.verdict.startswith("FAIL")]
        lines = [
            f"# GPU round: {device_name(self.records('other'))}, commit {self.commit}",
            "",
            f"{'DRY RUN on the CPU -- no GPU numbers. ' if self.dry else ''}Started "
            f"{self.started_utc}; {self.elapsed():.0f} s of a {self.budget_s:.0f} s budget; "
            f"{len(done)} stages run ({len(done) - len(bad)} ok, {len(bad)} failed), "
            f"{sum(r.status == 'skipped' for r in self.results)} skipped, "
            f"{sum(r.status == 'pending' for r in self.results)} not reached.",
            "",
            "| # | stage | rc | s | limit | headline | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(self.results, 1):
            if r.status == "running":
                verdict = f"running (started at {r.started:.0f} s; killed here if no later row)"
            elif r.status == "pending":
                verdict = "not reached"
            else:
                verdict = r.verdict
            lines.append(f"| {i} | {r.stage.name} | {'-' if r.rc is None else r.rc} | "
                         f"{r.seconds:.0f} | {r.limit:.0f} | "
                         f"{r.headline.replace('|', '/') or '-'} | {verdict} |")
        lines += ["", f"Logs: `{ARCHIVE}` (logs/NN_stage.log, profiles/, test reports, "
                      f"ptxas summary). Records: " + ", ".join(
                          f"`{f}`" for f in RECORD_FILES.values()) + ".",
                  "Speed-ups are against eager_amp_cl (eager, bf16 autocast, channels_last) "
                  "of the same preset; ±x% is the spread of the interleaved repetitions."]
        _atomic_write(os.path.join(self.out, SUMMARY), "\n".join(lines) + "\n")

    def pack(self) -> None:
        """The work folder (and a copy of the summary) as one archive, under the size limit."""
        _atomic_write(os.path.join(self.work, SUMMARY),
                      open(os.path.join(self.out, SUMMARY)).read())
        for cap in (4 * 2 ** 20, 2 ** 20, 2 ** 17):
            part = os.path.join(self.out, ARCHIVE + ".part")
            with tarfile.open(part, "w:gz") as tar:
                for base, _, files in os.walk(self.work):
                    for name in sorted(files):
                        path = os.path.join(base, name)
                        _add(tar, path, os.path.relpath(path, self.work), cap)
            if os.path.getsize(part) <= MAX_FILE_BYTES:
                break
        os.replace(part, os.path.join(self.out, ARCHIVE))


# ----------------------------------------------------------------------------- helpers
def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's whole process group, SIGKILL it if it does not go."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _add(tar: tarfile.TarFile, path: str, arcname: str, cap: int) -> None:
    """Add a file, keeping only its last ``cap`` bytes when it is larger."""
    try:
        size = os.path.getsize(path)
        if size <= cap:
            tar.add(path, arcname=arcname)
            return
        with open(path, "rb") as f:
            f.seek(size - cap)
            data = f"[gpu_round: first {size - cap} bytes cut]\n".encode() + f.read()
        info = tarfile.TarInfo(arcname)
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
    except OSError:
        pass   # a file vanishing mid-pack (a stage's temporary) is no reason to fail


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".part"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):   # a parent package missing
        return False


def _last_line(path: str) -> str:
    try:
        lines = [l.strip() for l in open(path, errors="replace") if l.strip()]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def device_name(other_path: str) -> str:
    for r in read_records(other_path):
        if r.get("benchmark") == "environment":
            return str(r.get("device"))
    return "device not yet read"


def make_shim(work: str) -> str:
    """A PYTHONPATH folder where ``cps_fast`` (with ``cps_fast.kernels`` -> kernels/) imports
    from the tree itself: the fallback when ``pip install -e .`` fails."""
    shim = os.path.join(work, "pyshim")
    pkg = os.path.join(shim, "cps_fast")
    shutil.rmtree(shim, ignore_errors=True)
    os.makedirs(pkg)
    src = os.path.join(ROOT, "cps_fast")
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), os.path.join(pkg, name))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(pkg, "kernels"))
    return shim


def _commit() -> str:
    """As benchmarks/_common.commit(), without importing torch (the driver stays light)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        if top.returncode == 0 and os.path.samefile(top.stdout.strip(), ROOT):
            sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=ROOT, capture_output=True, text=True,
                                   timeout=30).stdout.strip()
            if sha:
                return sha + ("-dirty" if dirty else "")
    except Exception:
        pass
    return os.environ.get("CPS_FAST_COMMIT") or "unknown"


def parse_inject(items: list) -> dict:
    out = {}
    for item in items:
        for part in filter(None, item.split(",")):
            name, _, what = part.partition("=")
            out[name.strip()] = what.strip()
    return out


def select(names: Optional[str], full: bool) -> list:
    stages = [s for s in STAGES if full or not s.full_only]
    if not names:
        return stages
    want = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.name: s for s in STAGES}
    bad = [n for n in want if n not in known]
    if bad:
        raise SystemExit(f"error: --stages: unknown stage(s) {', '.join(bad)} "
                         f"(known: {', '.join(known)})")
    return [known[n] for n in want]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="the folder that comes back (default $OUT)")
    ap.add_argument("--work", default=None,
                    help="work folder for logs and profiles (default <tmp>/cps_fast_round)")
    ap.add_argument("--budget-s", type=float,
                    default=float(os.environ.get("BUDGET_S", 540)))
    ap.add_argument("--dry", action="store_true", default=os.environ.get("DRY") == "1",
                    help="every stage's command on the CPU, tiny (tests of this script)")
    ap.add_argument("--stages", default=None, help="comma list: run only these, in this order")
    ap.add_argument("--full", action="store_true", help="also the full_only stages")
    ap.add_argument("--inject", action="append", default=[],
                    help="STAGE=fail|sleep: replace a stage's command (tests)")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    stages = select(args.stages, args.full)
    if args.list:
        for i, s in enumerate(stages, 1):
            print(f"{i:2d} {s.name:18s} {s.limit_s:4d} s" + (f"  (needs {s.needs})"
                                                              if s.needs else ""))
        return 0
    if not args.out:
        raise SystemExit("error: OUT: not set (the folder that comes back, e.g. OUT=$OUT)")
    inject = parse_inject(args.inject + [os.environ.get("CPS_FAST_ROUND_INJECT", "")])
    unknown = set(inject) - {s.name for s in STAGES}
    if unknown:
        raise SystemExit(f"error: --inject: unknown stage(s) {', '.join(sorted(unknown))}")
    work = args.work or os.path.join(os.environ.get("TMPDIR", "/tmp"), "cps_fast_round")
    if os.path.abspath(work).startswith(os.path.abspath(args.out) + os.sep):
        raise SystemExit(f"error: --work {work}: must not be inside OUT (only 8 files return)")
    shutil.rmtree(work, ignore_errors=True)
    rnd = Round(args.out, work, args.budget_s, args.dry, inject, _commit())
    rc = rnd.run(stages)
    print(f"[gpu_round] {rnd.elapsed():.0f} s; summary in {os.path.join(args.out, SUMMARY)}",
          flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
