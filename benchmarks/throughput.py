"""End-to-end CPS training-step throughput: the fast path against the eager path.

    python benchmarks/throughput.py [--quick] [--presets voc,city] [--variants ...]
                                    [--data memory|torch|dali] [--steps 20] [--reps 3]
                                    [--out FILE] [--profile DIR] [--no-interleave]

The ladder (``LADDER`` below, one line per variant; DESIGN.md section 9 names), each rung
adding one thing to the one before:

  eager_fp32       eager step, fp32, NCHW, reference (torch) losses
  eager_amp        + bf16 autocast
  eager_amp_cl     + channels_last                      <- the baseline of every speed-up
  fused            + fused loss kernels (train.kernels=auto: Triton on the GPU)
  graph_fused      + the whole step replayed as one CUDA graph (--path fast, train.compile=off)
  compiled_fast    + both networks and the losses compiled by TorchInductor inside that
                   graph (--path fast, train.compile=auto); compiled_fast_max_autotune the
                   same in Inductor's max-autotune mode (its CUDA graphs off, as always).
                   ``fast_compile`` in the record says what happened (compiled, compile_s,
                   the dry-run check's error, the fallback reason); ``--inductor
                   KEY=VALUE,...`` adds Inductor config patches to these two (experiments
                   for the GPU round, e.g. conv_1x1_as_mm=1, coordinate_descent_tuning=1)
  ddp_ws1          the fused step inside DistributedDataParallel at world size 1 (the
                   single-process overhead of DDP, against "fused")
  compile_default / compile_max_autotune / compile_reduce_overhead
                   torch.compile of the step's forward + losses (eager_amp_cl settings),
                   beside the ladder

Presets: ``voc`` (DeepLabv3+ R50, 8 labeled + 8 unlabeled, 512², CE) and ``city`` (800²,
OHEM). ``--data memory`` feeds fixed random batches already on the device (the step alone);
``--data torch|dali`` feeds the real loader over generated VOC/Cityscapes-sized JPEGs and
reports the fraction of the step spent waiting for data. FLOPs per step are counted with
``torch.utils.flop_counter`` and reported as MFU against the bf16 matmul rate measured in the
same run, beside the device's copy bandwidth.

Timing: every variant of a preset is built and warmed up first (peak memory is measured
then, as its own footprint); then ``--reps`` repetitions of ``--steps`` steps are taken in
turn, variant after variant, the order rotating each repetition, so that clock and thermal
drift hit all variants alike (``--no-interleave`` times one variant after the other, holding
one at a time, for ladders too large to hold together). Each record has the median and
the spread (max - min) of its repetitions, ms/step, and the speed-up against
``eager_amp_cl`` (never against fp32) when that ran beside it.

What ran, not what was asked: each record names the loss backend ``cps_fast.ops`` resolved
for every loss op (``loss_backend``), whether the CUDA graph was captured and how often it
was replayed, the AMP dtype, channels_last, the torch.compile graphs and breaks, and the
extension's state (``ext``: cuda / host-only / unavailable). A variant that did not get what
its name claims -- ``auto`` resolved to another backend than the device's first (Triton on
the GPU), a graph not captured, a torch.compile that compiled nothing -- is timed anyway
and says so in ``fallback`` (a list of reasons): a fallback is a failed measurement, not a
slow one. A variant that could not run at all has ``failed``.

Records are appended (flushed) to ``--out`` (default
``benchmarks/results/train_step-<device>.jsonl``) as each preset finishes; variants that
fail to build are written at once. $CPS_FAST_BENCH_DEADLINE (epoch seconds, set by the GPU
round) makes the run stop starting variants and repetitions it cannot finish, and write
what it has. ``--profile DIR`` adds where the time goes: kernel time per phase (forward +
losses, backward, optimiser) and the fraction of the wall time the device is busy, with each
variant's top-op table in DIR. A Markdown table goes to stdout.

``--quick`` runs a tiny configuration (tiny backbone, 64² crops, batch 2+2) on the CPU as a
smoke test; CPU numbers are smoke figures, never performance claims.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (append_jsonl, ceilings, device_slug, environment, ext_status,  # noqa: E402
                     fallback_from_auto, loss_backends, markdown_table, seconds_left)

from cps_fast import presets  # noqa: E402
from cps_fast.engine.compiled import CompiledStep  # noqa: E402
from cps_fast.engine.graph import GraphStep  # noqa: E402
from cps_fast.engine.optim import PolySGD  # noqa: E402
from cps_fast.engine.step import TrainStep  # noqa: E402
from cps_fast.models import build_model  # noqa: E402

# The ladder: one line per variant; adding a variant is adding a line (build() reads the
# fields; a key left out takes its DEFAULTS value). amp: autocast dtype; cl: channels_last;
# kernels: the loss backend asked (auto = the fused kernels, Triton on the GPU); graph: the
# whole step as one CUDA graph (GraphStep); compile: torch.compile mode of the step's
# forward + losses; fast_compile: the fast step's own compile of networks + losses
# (engine/compiled.py, its mode); ddp: inside DistributedDataParallel at world size 1.
DEFAULTS = dict(amp="bf16", cl=True, kernels="auto", graph=False, compile=None,
                fast_compile=None, ddp=False)
LADDER = {
    "eager_fp32": dict(amp="none", cl=False, kernels="torch"),
    "eager_amp": dict(cl=False, kernels="torch"),
    "eager_amp_cl": dict(kernels="torch"),
    "fused": dict(),
    "graph_fused": dict(graph=True),
    "compiled_fast": dict(graph=True, fast_compile="default"),
    "compiled_fast_max_autotune": dict(graph=True, fast_compile="max-autotune"),
    "ddp_ws1": dict(ddp=True),
    "compile_default": dict(kernels="torch", compile="default"),
    "compile_max_autotune": dict(kernels="torch", compile="max-autotune"),
    "compile_reduce_overhead": dict(kernels="torch", compile="reduce-overhead"),
}
BASELINE = "eager_amp_cl"   # every speed-up is against eager AMP channels_last, not fp32


def flags(variant: str) -> dict:
    if variant not in LADDER:
        raise SystemExit(f"error: --variants: unknown variant {variant!r} "
                         f"(known: {', '.join(LADDER)})")
    return {**DEFAULTS, **LADDER[variant]}


PRESETS = {"voc": "voc_r50_1-8", "city": "city_r50_1-8"}


def config_for(preset: str, variant: str, quick: bool, method: str):
    v = flags(variant)
    cfg = presets.get(PRESETS[preset], method)
    # Random weights time the same as ImageNet ones; the paper presets would otherwise
    # refuse to build without a backbone file (model.pretrained=required).
    items = [f"train.amp={v['amp']}", f"model.channels_last={str(v['cl']).lower()}",
             f"train.kernels={v['kernels']}", "model.pretrained=none"]
    if quick:
        items += ["model.backbone=tiny", "model.aspp_channels=32", "model.decoder_channels=32",
                  "model.low_level_channels=16", "data.crop_size=64", "data.batch_size=2",
                  "data.unlabeled_batch_size=2", "loss.ohem_min_kept=2000"]
    return cfg.apply_overrides(items)


def memory_batches(cfg, device, n=2):
    """Fixed random batches on the device (rotated, so no step sees identical inputs)."""
    g = torch.Generator().manual_seed(0)
    b, u, s, c = cfg.data.batch_size, cfg.data.unlabeled_batch_size, cfg.data.crop_size, \
        cfg.data.num_classes
    out = []
    for _ in range(n):
        label = torch.randint(0, c, (b, s, s), generator=g)
        label[:, :, : s // 16] = 255
        batch = {"image": torch.randn(b, 3, s, s, generator=g), "label": label,
                 "unlabeled": torch.randn(u, 3, s, s, generator=g),
                 "unlabeled2": torch.randn(u, 3, s, s, generator=g)}
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def loader_batches(cfg, device, data: str, workdir: str, preset: str, quick: bool = False):
    """Batches from the real loader (torch or DALI) over generated JPEGs (fewer, and one
    worker, with --quick)."""
    from data_pipeline import make_data

    from cps_fast.data.datasets import Splits, voc_info, cityscapes_info
    from cps_fast.data.loader import build_train_streams
    samples = make_data(os.path.join(workdir, preset), "voc-512" if preset == "voc"
                        else "cityscapes-800", 20 if quick else 64, "jpg")
    info = voc_info() if preset == "voc" else cityscapes_info(False)
    splits = Splits(samples[:16], samples[16:], [], info)
    dcfg = cfg.data.__class__(**{**cfg.data.__dict__, "loader": data,
                                 "num_workers": 1 if quick else 8, "check": "none"})
    streams = build_train_streams(dcfg, splits, 0, cfg.train.method)

    def nxt():
        lab = next(streams["labeled"])
        batch = {"image": lab["image"], "label": lab["label"],
                 "unlabeled": next(streams["unlabeled"])["image"]}
        if "unlabeled2" in streams:
            batch["unlabeled2"] = next(streams["unlabeled2"])["image"]
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return nxt, streams


def build(cfg, device, variant, compile_backend="inductor", inductor=None):
    """(step, note): the step the variant times, and why it is not what was asked (or None).
    ``inductor``: extra Inductor config patches of the fast_compile variants."""
    v = flags(variant)
    nets = []
    for i in range(2):
        torch.manual_seed(i)
        net = build_model(cfg.model, cfg.data.num_classes).to(device)
        nets.append(net.to(memory_format=torch.channels_last) if cfg.model.channels_last else net)
    opt = PolySGD(nets, cfg.optim, cfg.optim.lr, 10 ** 6, device)
    wrap = None
    if v["ddp"]:
        wrap = lambda m: ddp_world1(m, device)  # noqa: E731
    step = TrainStep(nets, opt, cfg, 0, device, None, wrap=wrap)
    if v["compile"] is not None:
        kw = ({"mode": v["compile"]} if compile_backend == "inductor"
              else {"backend": compile_backend})   # a mode needs inductor
        step.module = torch.compile(step.objective, **kw)
    if v["fast_compile"] is not None:
        step = CompiledStep(step, v["fast_compile"], options=inductor,
                            backend=None if compile_backend == "inductor" else compile_backend)
    if v["graph"]:
        if device.type != "cuda":
            return step, "CUDA graphs need a GPU: the step timed without one"
        return GraphStep(step, warmup=3), None
    return step, None


def parse_options(text):
    """'a=1,b.c=x' -> {'a': True, 'b.c': 'x'} (1/0/true/false are booleans, then numbers)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --inductor {item!r}: expected KEY=VALUE")
        low = raw.strip().lower()
        if low in ("1", "true", "0", "false"):
            val = low in ("1", "true")
        else:
            try:
                val = int(raw) if raw.strip().lstrip("-").isdigit() else float(raw)
            except ValueError:
                val = raw.strip()
        out[key.strip()] = val
    return out


def ddp_world1(module, device):
    """DDP over a one-process group (NCCL on the GPU, gloo on the CPU)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        # An in-process store: one rank needs no TCP rendezvous (a fixed port collided with
        # other jobs on a shared machine).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def count_flops(cfg, device, batch) -> float:
    """FLOPs of one step's forward + backward (the optimiser's are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode
    step, _ = build(cfg, device, "eager_amp_cl")
    with FlopCounterMode(display=False) as fc:
        out = step.losses(batch)
        out["loss"].backward()
    return float(fc.get_total_flops())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rep(step, feed, device, steps) -> tuple[float, float]:
    """One repetition: (ms per step, fraction of the wall time spent waiting for data)."""
    wait = 0.0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        batch = feed()
        wait += time.perf_counter() - tw
        step(batch)
    sync(device)  # host sync: end of the timed region only
    total = time.perf_counter() - t0
    return 1000 * total / steps, wait / total


def _dev_time(evt) -> float:
    """An event's device time in microseconds (attribute names vary across torch)."""
    for name in ("device_time_total", "cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_variant(step, feed, device, steps: int, table_path: str) -> dict:
    """Where one step's time goes, from ``torch.profiler`` over ``steps`` steps.

    Kernel time is split by the top-level operation that launched it: the optimiser
    (torch's ``Optimizer.step#...`` range), the backward (``autograd::engine::...``,
    the autograd thread) and everything else (the forward and the losses). Also the
    device-busy fraction: kernel time over wall time -- well below 1 means the host
    (kernel launches, Python) is the bottleneck, which is what a CUDA graph removes. A
    replayed graph shows only its kernels (no per-op attribution). On the CPU the same
    split uses CPU time (a smoke figure)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    batches = [feed() for _ in range(steps)]
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for b in batches:
            step(b)
        sync(device)  # host sync: end of the profiled region
        wall_ms = 1000 * (time.perf_counter() - t0)
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for evt in prof.events():
        if evt.cpu_parent is not None or not str(evt.device_type).endswith("CPU"):
            continue
        t = _dev_time(evt) if cuda else float(evt.cpu_time_total)
        if evt.name.startswith("Optimizer.step"):
            phases["optimizer"] += t
        elif evt.name.startswith("autograd::engine"):
            phases["backward"] += t
        else:
            phases["forward"] += t
    out = {"phase_ms": {k: v / 1000 / steps for k, v in phases.items()}}
    if cuda:
        # Kernels (and copies) carry self device time; CPU ops carry none; GPU-side user
        # ranges (Optimizer.step on the device timeline) would count their kernels twice.
        kernel_us = sum(getattr(e, "self_device_time_total", 0.0) or 0.0
                        for e in prof.key_averages()
                        if not getattr(e, "is_user_annotation", False))
        out["kernel_ms_per_step"] = kernel_us / 1000 / steps
        out["device_busy_frac"] = kernel_us / 1000 / max(wall_ms, 1e-9)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
    except Exception:  # an older torch names the column differently
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda
                                          else "self_cpu_time_total", row_limit=30)
    with open(table_path, "w") as f:
        f.write(f"{steps} steps, wall {wall_ms:.1f} ms; {out}\n\n{table}\n")
    return out


def release(device) -> None:
    """Free what a finished variant held (its graph pool too) so the next one's peak memory
    is its own."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process (torch._dynamo's counters)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return 0, 0
    return (int(counters["stats"].get("unique_graphs", 0)),
            int(sum(counters["graph_break"].values())))


def _loss_ops(cfg) -> list[str]:
    sup = "ohem_cross_entropy" if cfg.loss.supervised == "ohem" else "cross_entropy"
    if cfg.train.method == "supervised":
        return [sup]
    # CPS + CutMix takes the cross-entropy of the mixed predictions against pseudo-labels
    return [sup, "cps_loss" if cfg.train.method == "cps" else "cross_entropy"]


def _what_ran(rec: dict, cfg, variant: str, step, note, device, graphs_before) -> None:
    """Fill in what actually ran, and every reason it is not what the variant claims."""
    v = flags(variant)
    backends = loss_backends(dict.fromkeys(_loss_ops(cfg)), cfg.train.kernels, device.type)
    fallback = fallback_from_auto(backends, cfg.train.kernels, device.type)
    rec.update(loss_backend=backends, kernels_asked=cfg.train.kernels,
               amp_dtype={"none": None, "bf16": "bfloat16", "fp16": "float16"}[cfg.train.amp],
               channels_last=cfg.model.channels_last)
    captured = isinstance(step, GraphStep) and step.captured
    replays = max(0, step.calls - step.warmup) if captured else 0
    rec["graph"] = dict(asked=v["graph"], captured=captured, replays=replays)
    if v["graph"] and not captured:
        why = note or (step.fallback_reason if isinstance(step, GraphStep) else None)
        fallback.append(f"CUDA graph not captured: {why or 'unknown reason'}")
    elif v["graph"] and replays == 0:
        fallback.append("CUDA graph captured but never replayed")
    if v["fast_compile"] is not None:
        inner = step.step if isinstance(step, GraphStep) else step
        rec["fast_compile"] = inner.report() if isinstance(inner, CompiledStep) else None
        if not (rec["fast_compile"] or {}).get("compiled"):
            fallback.append((rec["fast_compile"] or {}).get("compile_fallback")
                            or "the networks were not compiled")
    if v["compile"] is not None:
        graphs, breaks = _dynamo_counts()
        rec["compile_graphs"] = graphs - graphs_before[0]
        rec["compile_graph_breaks"] = breaks - graphs_before[1]
        if rec["compile_graphs"] <= 0:
            fallback.append("torch.compile compiled no graph: the step ran eagerly")
    rec["fallback"] = fallback or None


class Runner:
    """One variant of one preset, built and warmed up, timed repetition by repetition."""

    def __init__(self, rec, step, feed, streams):
        self.rec, self.step, self.feed, self.streams = rec, step, feed, streams
        self.samples: list[float] = []
        self.waits: list[float] = []
        self.rep_s = 0.0

    def close(self):
        for s in (self.streams or {}).values():
            s.close()
        self.step = self.feed = self.streams = None


def _error(e: Exception) -> str:
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def prepare(rec, cfg, variant, preset, device, args, workdir, steps) -> Runner:
    """Build the variant, warm it up (JIT, capture, autotuning), measure its peak memory."""
    graphs_before = _dynamo_counts()
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step, note = build(cfg, device, variant, args.compile_backend, args.inductor_options)
    streams = None
    if args.data == "memory":
        pool = memory_batches(cfg, device)
        it = iter(range(10 ** 9))
        feed = (lambda: pool[next(it) % len(pool)])
    else:
        feed, streams = loader_batches(cfg, device, args.data, workdir, preset, args.quick)
    runner = Runner(rec, step, feed, streams)
    try:
        warmup = 5 if device.type == "cuda" else 1   # > GraphStep's 3 warm-ups + capture
        for _ in range(warmup):
            step(feed())
        sync(device)
        rec["warmup_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            rec["peak_mem_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30
        _what_ran(rec, cfg, variant, step, note, device, graphs_before)
    except BaseException:
        runner.close()
        raise
    return runner


def finish(r: Runner, images: int, flops: float, tflops, steps: int) -> None:
    rec = r.rec
    rec["reps_done"] = len(r.samples)
    if not r.samples:
        rec["failed"] = "not timed: the stage's time ran out before the first repetition"
        return
    med = statistics.median(r.samples)
    rec.update(median_ms=med, spread_ms=max(r.samples) - min(r.samples),
               spread_rel=(max(r.samples) - min(r.samples)) / med, samples_ms=r.samples,
               images_per_s=1000 * images / med,
               data_wait_frac=statistics.median(r.waits) if rec["data"] != "memory" else 0.0)
    if tflops:
        rec["mfu"] = flops / (med / 1000) / (tflops * 1e12)
    if isinstance(r.step, GraphStep) and r.step.captured:   # the timed steps replayed too
        rec["graph"]["replays"] = max(0, r.step.calls - r.step.warmup)


def run_preset(preset, variants, args, device, env, ceil, workdir, out_path, steps) -> list:
    base_cfg = config_for(preset, BASELINE, args.quick, args.method)
    flops = count_flops(base_cfg, device, memory_batches(base_cfg, device, n=1)[0])
    images = base_cfg.data.batch_size + base_cfg.data.unlabeled_batch_size * (
        2 if args.method == "cps-cutmix" else 1)
    ext = ext_status()
    done, runners = [], []
    base_ms = [None]      # the baseline's median, once measured

    def new_record(variant, cfg):
        return dict(env, benchmark="train_step", variant=variant, preset=preset,
                    method=args.method, data=args.data, steps=steps, reps=args.reps,
                    interleaved=not args.no_interleave, images_per_step=images,
                    flops_per_step=flops, baseline=BASELINE,
                    config={"amp": cfg.train.amp, "channels_last": cfg.model.channels_last,
                            "kernels": cfg.train.kernels, "backbone": cfg.model.backbone,
                            "crop": cfg.data.crop_size,
                            "batch": [cfg.data.batch_size, cfg.data.unlabeled_batch_size]},
                    **ext, **{f"ceiling_{k}": v for k, v in ceil.items()})

    def time_reps(group):
        for rep in range(args.reps):
            order = group[rep % len(group):] + group[:rep % len(group)]
            need = sum(r.rep_s for r in order) or 0.0
            if rep and seconds_left() < 1.5 * need + 5:
                print(f"{preset}: stopping after {rep} repetitions (stage deadline)",
                      file=sys.stderr, flush=True)
                return
            for r in order:
                t0 = time.perf_counter()
                try:
                    ms, wait = time_rep(r.step, r.feed, device, steps)
                except Exception as e:
                    r.rec["failed"] = f"during repetition {rep}: {_error(e)}"
                    group.remove(r)
                    continue
                r.rep_s = time.perf_counter() - t0
                r.samples.append(ms)
                r.waits.append(wait)
                print(f"{preset} {r.rec['variant']} rep {rep}: {ms:.1f} ms/step",
                      file=sys.stderr, flush=True)
            if not group:
                return

    def complete(group):
        for r in group:
            if "failed" in r.rec:       # failed during a repetition: nothing to add
                continue
            finish(r, images, flops, ceil.get("matmul_tflops"), steps)
            if args.profile and "failed" not in r.rec:
                os.makedirs(args.profile, exist_ok=True)
                try:  # a profiler problem must not lose the timing above
                    table = os.path.join(args.profile,
                                         f"profile-{preset}-{r.rec['variant']}.txt")
                    r.rec.update(profile_variant(r.step, r.feed, device, min(3, steps), table))
                    r.rec["profiled"] = True
                except Exception as e:
                    r.rec["profile_failed"] = _error(e)
            if r.rec["variant"] == BASELINE and "median_ms" in r.rec:
                base_ms[0] = r.rec["median_ms"]

    def emit(rec):
        if base_ms[0] and rec.get("median_ms"):
            rec["speedup_vs_eager_amp_cl"] = base_ms[0] / rec["median_ms"]
        append_jsonl(out_path, [rec])
        done.append(rec)
        print(f"{preset} {rec['variant']}: " + (
            f"{rec['median_ms']:.1f} ms/step" if "median_ms" in rec else rec["failed"])
            + (f"  FALLBACK: {'; '.join(rec['fallback'])}" if rec.get("fallback") else ""),
            file=sys.stderr, flush=True)

    for variant in variants:
        cfg = config_for(preset, variant, args.quick, args.method)
        rec = new_record(variant, cfg)
        if seconds_left() < 15:
            rec["failed"] = "not measured: the stage's time ran out before it was built"
            emit(rec)
            continue
        try:
            runner = prepare(rec, cfg, variant, preset, device, args, workdir, steps)
        except Exception as e:  # record the failure, keep measuring the rest
            rec["failed"] = _error(e)
            if device.type == "cuda" and "out of memory" in str(e) and runners:
                rec["failed"] += (f" (while {len(runners)} other variants were held for "
                                  "interleaved timing: --no-interleave holds one)")
            emit(rec)
            release(device)
            continue
        if args.no_interleave:
            time_reps([runner])
            complete([runner])
            emit(runner.rec)
            runner.close()
            release(device)
        else:
            runners.append(runner)
    if runners:
        time_reps(list(runners))
        complete(runners)
        for r in runners:
            emit(r.rec)
            r.close()
        release(device)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke configuration")
    p.add_argument("--presets", default=None, help="comma list of voc, city")
    p.add_argument("--variants", default=None, help=f"comma list of {', '.join(LADDER)}")
    p.add_argument("--method", default="cps", choices=("cps", "cps-cutmix"))
    p.add_argument("--data", default="memory", choices=("memory", "torch", "dali"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-interleave", action="store_true",
                   help="time one variant after the other, holding one at a time")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile_* variants (default inductor; "
                        "'eager' only traces: the GPU round's CPU dry run)")
    p.add_argument("--out", default=None, help="JSON-lines file (default benchmarks/results/)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile a few steps of each variant: per-phase times and the "
                        "device-busy fraction in the record, the top-30 op table in DIR")
    p.add_argument("--inductor", default=None, metavar="KEY=VALUE,...",
                   help="Inductor config patches for the compiled_fast variants (recorded)")
    args = p.parse_args(argv)
    args.inductor_options = parse_options(args.inductor)

    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if args.quick and "OMP_NUM_THREADS" not in os.environ:
        # (a loaded machine wants 1: OpenMP threads that outnumber the free cores spin
        # and run 10-20x slower; the GPU round's dry run sets OMP_NUM_THREADS=1)
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer (train.cudnn_benchmark)
    preset_names = (args.presets or ("voc" if args.quick else "voc,city")).split(",")
    for name in preset_names:
        if name not in PRESETS:
            raise SystemExit(f"error: --presets: unknown preset {name!r} (known: voc, city)")
    variants = (args.variants or ("eager_fp32,eager_amp_cl,fused,graph_fused" if args.quick
                                  else ",".join(LADDER))).split(",")
    for v in variants:
        flags(v)
    env = environment(device)
    ceil = ceilings(device, quick=args.quick)
    steps = args.steps or (3 if args.quick else 20)
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results",
                                        f"train_step-{device_slug(env['device'])}.jsonl")
    records = []
    with tempfile.TemporaryDirectory() as workdir:
        for preset in preset_names:
            records += run_preset(preset, variants, args, device, env, ceil, workdir,
                                  out_path, steps)
    print(f"\n{env['device']} · torch {env['torch']} · triton {env['triton']} · commit "
          f"{env['commit']} · ceilings: {ceil}\n")
    rows = [dict(r, backend=",".join(sorted(set((r.get("loss_backend") or {}).values()))),
                 captured=(r.get("graph") or {}).get("captured"),
                 fallback="; ".join(r.get("fallback") or []) or None) for r in records]
    print(markdown_table(rows, ["preset", "variant", "median_ms", "spread_ms", "images_per_s",
                                "speedup_vs_eager_amp_cl", "mfu", "peak_mem_gb", "backend",
                                "captured", "data_wait_frac", "fallback", "failed"]))
    if args.profile:
        rows = [dict(preset=r["preset"], variant=r["variant"],
                     **{f"{k}_ms": v for k, v in r.get("phase_ms", {}).items()},
                     device_busy_frac=r.get("device_busy_frac")) for r in records]
        print("\nwhere the time goes (profiled, per step)\n")
        print(markdown_table(rows, ["preset", "variant", "forward_ms", "backward_ms",
                                    "optimizer_ms", "device_busy_frac"]))
    print(f"\nrecords appended to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
