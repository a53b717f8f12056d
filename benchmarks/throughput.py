"""End-to-end CPS training-step throughput: the fast path against the eager path.

    python benchmarks/throughput.py [--quick] [--presets voc,city] [--variants ...]
                                    [--data memory|torch|dali] [--steps 20] [--reps 3]

The ladder, each rung adding one thing to the one before (DESIGN.md section 9 names):

  eager_fp32       eager step, fp32, NCHW, reference (torch) losses
  eager_amp        + bf16 autocast
  eager_amp_cl     + channels_last
  fused            + fused loss kernels (train.kernels=auto: Triton on the GPU)
  graph_fused      + the whole step replayed as one CUDA graph (--path fast)
  ddp_ws1          the fused step inside DistributedDataParallel at world size 1 (the
                   single-process overhead of DDP, against "fused")
  compile_default / compile_max_autotune / compile_reduce_overhead
                   torch.compile of the step's forward + losses (eager_amp_cl settings),
                   beside the ladder; a mode that fails to compile is recorded as failed

Presets: ``voc`` (DeepLabv3+ R50, 8 labeled + 8 unlabeled, 512², CE) and ``city`` (800²,
OHEM). ``--data memory`` feeds fixed random batches already on the device (the step alone);
``--data torch|dali`` feeds the real loader over generated VOC/Cityscapes-sized JPEGs and
reports the fraction of the step spent waiting for data. FLOPs per step are counted with
``torch.utils.flop_counter`` and reported as MFU against the bf16 matmul rate measured in the
same run, beside the device's copy bandwidth. Each variant is timed ``--reps`` times over
``--steps`` steps (median and spread, ms/step). ``--profile DIR`` adds where the time goes:
kernel time per phase (forward + losses, backward, optimiser) and the fraction of the wall
time the device is busy, with each variant's top-op table in DIR. Records are appended to
``benchmarks/results/train_step-<device>.jsonl`` one by one as they are measured; a Markdown
table goes to stdout.

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

from _common import append_jsonl, ceilings, device_slug, environment, markdown_table  # noqa: E402

from cps_fast import presets  # noqa: E402
from cps_fast.engine.graph import GraphStep  # noqa: E402
from cps_fast.engine.optim import PolySGD  # noqa: E402
from cps_fast.engine.step import TrainStep  # noqa: E402
from cps_fast.models import build_model  # noqa: E402

LADDER = {
    "eager_fp32": dict(amp="none", cl=False, kernels="torch", graph=False, compile=None),
    "eager_amp": dict(amp="bf16", cl=False, kernels="torch", graph=False, compile=None),
    "eager_amp_cl": dict(amp="bf16", cl=True, kernels="torch", graph=False, compile=None),
    "fused": dict(amp="bf16", cl=True, kernels="auto", graph=False, compile=None),
    "graph_fused": dict(amp="bf16", cl=True, kernels="auto", graph=True, compile=None),
    "ddp_ws1": dict(amp="bf16", cl=True, kernels="auto", graph=False, compile=None, ddp=True),
    "compile_default": dict(amp="bf16", cl=True, kernels="torch", graph=False, compile="default"),
    "compile_max_autotune": dict(amp="bf16", cl=True, kernels="torch", graph=False,
                                 compile="max-autotune"),
    "compile_reduce_overhead": dict(amp="bf16", cl=True, kernels="torch", graph=False,
                                    compile="reduce-overhead"),
}
PRESETS = {"voc": "voc_r50_1-8", "city": "city_r50_1-8"}


def config_for(preset: str, variant: str, quick: bool, method: str):
    v = LADDER[variant]
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


def loader_batches(cfg, device, data: str, workdir: str, preset: str):
    """Batches from the real loader (torch or DALI) over generated JPEGs."""
    from data_pipeline import make_data

    from cps_fast.data.datasets import Splits, voc_info, cityscapes_info
    from cps_fast.data.loader import build_train_streams
    samples = make_data(os.path.join(workdir, preset), "voc-512" if preset == "voc"
                        else "cityscapes-800", 64, "jpg")
    info = voc_info() if preset == "voc" else cityscapes_info(False)
    splits = Splits(samples[:16], samples[16:], [], info)
    dcfg = cfg.data.__class__(**{**cfg.data.__dict__, "loader": data, "num_workers": 8,
                                 "check": "none"})
    streams = build_train_streams(dcfg, splits, 0, cfg.train.method)

    def nxt():
        lab = next(streams["labeled"])
        batch = {"image": lab["image"], "label": lab["label"],
                 "unlabeled": next(streams["unlabeled"])["image"]}
        if "unlabeled2" in streams:
            batch["unlabeled2"] = next(streams["unlabeled2"])["image"]
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return nxt, streams


def build(cfg, device, variant):
    nets = []
    for i in range(2):
        torch.manual_seed(i)
        net = build_model(cfg.model, cfg.data.num_classes).to(device)
        nets.append(net.to(memory_format=torch.channels_last) if cfg.model.channels_last else net)
    opt = PolySGD(nets, cfg.optim, cfg.optim.lr, 10 ** 6, device)
    wrap = None
    if LADDER[variant].get("ddp"):
        wrap = lambda m: ddp_world1(m, device)  # noqa: E731
    step = TrainStep(nets, opt, cfg, 0, device, None, wrap=wrap)
    mode = LADDER[variant]["compile"]
    if mode is not None:
        step.module = torch.compile(step.objective, mode=mode)
    if LADDER[variant]["graph"]:
        if device.type != "cuda":
            return step, "CUDA graphs need a GPU: eager step timed instead"
        return GraphStep(step, warmup=3), None
    return step, None


def ddp_world1(module, device):
    """DDP over a one-process group (NCCL on the GPU, gloo on the CPU)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
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


def time_variant(step, feed, device, steps, reps, warmup):
    wait = 0.0
    for _ in range(warmup):
        step(feed())
    sync(device)
    samples, waits = [], []
    for _ in range(reps):
        wait = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            tw = time.perf_counter()
            batch = feed()
            wait += time.perf_counter() - tw
            step(batch)
        sync(device)  # host sync: end of the timed region only
        total = time.perf_counter() - t0
        samples.append(1000 * total / steps)
        waits.append(wait / total)
    return samples, statistics.median(waits)


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
    p.add_argument("--out", default=None, help="JSON-lines file (default benchmarks/results/)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile a few steps of each variant: per-phase times and the "
                        "device-busy fraction in the record, the top-30 op table in DIR")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if args.quick:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer (train.cudnn_benchmark)
    env = environment(device)
    ceil = ceilings(device, quick=args.quick)
    preset_names = (args.presets or ("voc" if args.quick else "voc,city")).split(",")
    variants = (args.variants or ("eager_fp32,eager_amp_cl,fused,graph_fused" if args.quick
                                  else ",".join(LADDER))).split(",")
    steps = args.steps or (3 if args.quick else 20)
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results",
                                        f"train_step-{device_slug(env['device'])}.jsonl")
    records = []
    with tempfile.TemporaryDirectory() as workdir:
        for preset in preset_names:
            base_cfg = config_for(preset, "eager_amp_cl", args.quick, args.method)
            flops_batch = memory_batches(base_cfg, device, n=1)[0]
            flops = count_flops(base_cfg, device, flops_batch)
            images = base_cfg.data.batch_size + base_cfg.data.unlabeled_batch_size * (
                2 if args.method == "cps-cutmix" else 1)
            for variant in variants:
                cfg = config_for(preset, variant, args.quick, args.method)
                rec = dict(env, benchmark="train_step", variant=variant, preset=preset,
                           method=args.method, data=args.data, steps=steps, reps=args.reps,
                           images_per_step=images, flops_per_step=flops,
                           config={"amp": cfg.train.amp, "channels_last": cfg.model.channels_last,
                                   "kernels": cfg.train.kernels,
                                   "backbone": cfg.model.backbone, "crop": cfg.data.crop_size,
                                   "batch": [cfg.data.batch_size, cfg.data.unlabeled_batch_size]},
                           **{f"ceiling_{k}": v for k, v in ceil.items()})
                streams = None
                try:
                    step, note = build(cfg, device, variant)
                    if args.data == "memory":
                        pool = memory_batches(cfg, device)
                        it = iter(range(10 ** 9))
                        feed = (lambda: pool[next(it) % len(pool)])
                    else:
                        feed, streams = loader_batches(cfg, device, args.data, workdir, preset)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    samples, wait = time_variant(step, feed, device, steps, args.reps,
                                                 warmup=5 if device.type == "cuda" else 1)
                    med = statistics.median(samples)
                    rec.update(median_ms=med, spread_ms=max(samples) - min(samples),
                               samples_ms=samples, images_per_s=1000 * images / med,
                               data_wait_frac=wait if args.data != "memory" else 0.0,
                               peak_mem_gb=(torch.cuda.max_memory_allocated(device) / 2 ** 30
                                            if device.type == "cuda" else None))
                    tflops = ceil.get("matmul_tflops")
                    if tflops:
                        rec["mfu"] = flops / (med / 1000) / (tflops * 1e12)
                    if note:
                        rec["note"] = note
                    if isinstance(step, GraphStep) and step.fallback_reason:
                        rec["note"] = step.fallback_reason
                    if args.profile:
                        os.makedirs(args.profile, exist_ok=True)
                        try:  # a profiler problem must not lose the timing above
                            rec.update(profile_variant(step, feed, device, 3, os.path.join(
                                args.profile, f"profile-{preset}-{variant}.txt")))
                        except Exception as e:
                            rec["profile_failed"] = f"{type(e).__name__}: {str(e)[:200]}"
                except Exception as e:  # record the failure, keep measuring the rest
                    msg = str(e).splitlines()[0][:300] if str(e) else ""
                    rec.update(failed=f"{type(e).__name__}: {msg}")
                finally:
                    for s in (streams or {}).values():
                        s.close()
                    step = feed = streams = None
                    release(device)
                # One record at a time: a run cut short (a time limit) keeps what it measured.
                append_jsonl(out_path, [rec])
                records.append(rec)
                print(f"{preset} {variant}: " + (f"{rec['median_ms']:.1f} ms/step"
                                                 if "median_ms" in rec else rec["failed"]),
                      file=sys.stderr, flush=True)
    base = {r["preset"]: r.get("median_ms") for r in records if r["variant"] == variants[0]}
    for r in records:
        if r.get("median_ms") and base.get(r["preset"]):
            r["speedup"] = base[r["preset"]] / r["median_ms"]
    print(f"\n{env['device']} · torch {env['torch']} · triton {env['triton']} · commit "
          f"{env['commit']} · ceilings: {ceil}\n")
    print(markdown_table(records, ["preset", "variant", "median_ms", "spread_ms", "images_per_s",
                                   "speedup", "mfu", "peak_mem_gb", "data_wait_frac", "note",
                                   "failed"]))
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
