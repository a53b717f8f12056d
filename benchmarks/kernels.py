"""Per-kernel benchmark: the Triton loss kernels against their eager references and
against torch.compile of the references, forward + backward.

    python benchmarks/kernels.py                     # GPU: VOC and Cityscapes shapes
    python benchmarks/kernels.py --quick             # CPU smoke (Triton interpreter, tiny)
    python benchmarks/kernels.py --ops cps_loss --layouts nchw,cl --dtype bf16 --rounds 2
    python benchmarks/kernels.py --sweep             # + launch-shape sweep of the fused kernels

Cases (bf16 logits unless --dtype; each in NCHW and channels_last unless --layouts):
  cps_loss            voc: a, b = 16x21x512^2 (+ valid mask); cityscapes: 16x19x800^2
  cross_entropy       voc-sup: 8x21x512^2; cityscapes: 16x19x800^2
  ohem_cross_entropy  cityscapes-sup: 8x19x800^2 = 5.12 M pixels (the issue's target
                      shape; thresh 0.7, min_kept 50000); cityscapes: 16x19x800^2
Variants: eager (the reference in kernels/: for OHEM ``ohem_cross_entropy_reference``, the
official sort-based per-image selection -- not ``torch.kthvalue``, which runs as a single
block on CUDA and would flatter the fused kernel), triton (cps_fast.ops backend "triton"),
compile (torch.compile of the reference, default mode). Each record's ``baseline`` /
``backend`` fields say what ran. min_kept is per image.

Byte model (the compulsory traffic of forward + backward, the same numerator for every
variant, so GB/s compare like for like; P = pixels, es = logits element size, te =
target element size):
  cps_loss            P * (4*C*es + 1)    read a, b, valid; write grad_a, grad_b
  cross_entropy       P * (2*C*es + te)   read logits, target; write grad
  ohem_cross_entropy  P * (2*C*es + te)   read logits, target; write grad
The Triton kernels move more than that (CE / CPS: the backward scales the stored gradient,
+ 2*C*es per pixel per tensor; OHEM: the backward re-reads the logits, + C*es + 20 B per
pixel for keys, ce and the histogram passes): frac_copy_bw says how close the *useful*
traffic gets to the measured device-to-device copy bandwidth.

Timing: CUDA events around each forward + backward (median of --reps after --warmup); with
--rounds N every variant of a case is timed once per round, the variants taking turns, so
that drift hits them alike (a difference below the spread between rounds is noise);
peak_mem_gb = peak allocated during one forward + backward above what the inputs already
hold. Records (DESIGN.md section 9) are appended and flushed one by one to
benchmarks/results/kernels-<device>.jsonl (a run cut short keeps what it measured;
$CPS_FAST_BENCH_DEADLINE, set by the GPU round, stops it before a case it cannot finish),
a Markdown table goes to stdout. CPU figures (--quick) are smoke figures only.

A GPU round (TRITON_INTERPRET must be off: tests/conftest.py turns it on by default):

    export TRITON_INTERPRET=0
    python3 -m pytest -q -m gpu tests/kernels                      # real shapes vs reference
    python3 benchmarks/kernels.py --variants eager,triton --out $OUT/kernels.jsonl
    python3 benchmarks/kernels.py --variants compile --rounds 1 --out $OUT/kernels.jsonl
    python3 benchmarks/kernels.py --ops cps_loss --variants triton --sweep --rounds 1 \
        --out $OUT/kernels-sweep.jsonl                             # launch-shape sweep

(torch.compile takes tens of seconds per case to compile, hence its own call; the sweep
times the fused forward kernels over BLOCK_P x TILES x num_warps on each op's first case.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (interpreter)")
    ap.add_argument("--ops", default="cps_loss,cross_entropy,ohem_cross_entropy")
    ap.add_argument("--variants", default=None,
                    help="comma list of eager,triton,compile (default: all; "
                         "--quick: eager,triton)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--layouts", default="nchw,cl")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--sweep", action="store_true",
                    help="also time the fused forward kernels over BLOCK_P / TILES / num_warps")
    ap.add_argument("--out", default=None, help="JSONL file (default benchmarks/results/"
                                                "kernels-<device>.jsonl)")
    return ap.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None and ARGS.quick:
    # Off the GPU the kernels run in Triton's interpreter; it must be on before triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import _common as bc  # noqa: E402
from cps_fast import ops  # noqa: E402
from cps_fast.kernels.cps_loss import cps_loss_reference  # noqa: E402
from cps_fast.kernels.cross_entropy import cross_entropy_reference  # noqa: E402
from cps_fast.kernels.ohem_cross_entropy import ohem_cross_entropy_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL_CASES = {
    "cps_loss": [("voc", (16, 21, 512, 512)), ("cityscapes", (16, 19, 800, 800))],
    "cross_entropy": [("voc-sup", (8, 21, 512, 512)), ("cityscapes", (16, 19, 800, 800))],
    "ohem_cross_entropy": [("cityscapes-sup", (8, 19, 800, 800)),
                           ("cityscapes", (16, 19, 800, 800))],
}
QUICK_CASES = {
    "cps_loss": [("quick", (2, 21, 16, 24))],
    "cross_entropy": [("quick", (2, 21, 16, 24))],
    "ohem_cross_entropy": [("quick", (2, 19, 16, 24))],
}
THRESH, MIN_KEPT = 0.7, 50000

# What each variant runs, as recorded with it (the baseline is always the eager reference).
VARIANTS = {
    "eager": lambda op: dict(backend="torch", baseline=(
        "ohem_cross_entropy_reference (sort-based, per image)" if op == "ohem_cross_entropy"
        else f"{op}_reference")),
    "triton": lambda op: dict(backend="triton"),
    "compile": lambda op: dict(backend="torch.compile(reference)"),
}


def _inputs(op, shape, dtype, layout, device, gen):
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format

    def logits():
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(3)
        return x.to(dtype).contiguous(memory_format=fmt).requires_grad_(True)

    target = torch.randint(0, c, (n, h, w), generator=gen, device=device, dtype=torch.int64)
    target[torch.rand((n, h, w), generator=gen, device=device) < 0.1] = 255
    target = target.to(torch.uint8)     # labels as the data layer delivers them
    if op == "cps_loss":
        valid = torch.rand((n, h, w), generator=gen, device=device) > 0.05
        lab = torch.arange(n, device=device) < n // 2
        return dict(a=logits(), b=logits(), valid=valid, lab=lab)
    # --quick: a min_kept below the pixel count, so the device selection actually runs
    return dict(x=logits(), t=target, min_kept=MIN_KEPT if n * h * w > 4 * MIN_KEPT
                else n * h * w // 4)


def _bytes_model(op, shape, dtype):
    n, c, h, w = shape
    p = n * h * w
    es = torch.empty((), dtype=dtype).element_size()
    if op == "cps_loss":
        return p * (4 * c * es + 1), "P*(4*C*es+1)"
    return p * (2 * c * es + 1), "P*(2*C*es+te), te=1 (uint8 labels)"


def _make_step(op, variant, inp):
    """A closure running forward + backward once (grads reset, so nothing accumulates)."""
    if op == "cps_loss":
        a, b, valid, lab = inp["a"], inp["b"], inp["valid"], inp["lab"]
        if variant == "triton":
            fwd = lambda: ops.cps_loss(a, b, valid, lab, backend="triton")[0]  # noqa: E731
        else:
            ref = cps_loss_reference if variant == "eager" else _compiled(cps_loss_reference)
            fwd = lambda: ref(a, b, valid, lab)[0]  # noqa: E731
        leaves = (a, b)
    else:
        x, t = inp["x"], inp["t"]
        mk = inp["min_kept"]
        leaves = (x,)
        if op == "cross_entropy":
            if variant == "triton":
                fwd = lambda: ops.cross_entropy(x, t, backend="triton")  # noqa: E731
            else:
                ref = (cross_entropy_reference if variant == "eager"
                       else _compiled(cross_entropy_reference))
                fwd = lambda: ref(x, t)  # noqa: E731
        else:
            if variant == "triton":
                fwd = lambda: ops.ohem_cross_entropy(x, t, THRESH, mk,  # noqa: E731
                                                     backend="triton")
            else:
                ref = (ohem_cross_entropy_reference if variant == "eager"
                       else _compiled(ohem_cross_entropy_reference))
                fwd = lambda: ref(x, t, THRESH, mk)  # noqa: E731

    def reset():
        for leaf in leaves:
            leaf.grad = None

    def step():
        reset()
        fwd().backward()
    step.reset = reset
    return step


_COMPILED = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)   # one static graph per shape
    return _COMPILED[fn]


def _sweep(op, inp, shape, device, env, args, base):
    """Forward kernel only, over launch shapes (the GPU session picks the defaults from it)."""
    from cps_fast.kernels import cps_loss as cps_mod
    from cps_fast.kernels import cross_entropy as ce_mod
    from cps_fast.kernels import ohem_cross_entropy as ohem_mod
    recs = []
    for block_p in (32, 64, 128, 256):
        for tiles in (1, 4, 8, 16):
            for warps in (4, 8):
                if op == "cps_loss":
                    fn = lambda: cps_mod._cps_impl(inp["a"], inp["b"], inp["valid"],  # noqa: E731
                                                   inp["lab"], 0, True, block_p, tiles,
                                                   warps)
                elif op == "cross_entropy":
                    fn = lambda: ce_mod._ce_impl(inp["x"], inp["t"], 255, True,  # noqa: E731
                                                 block_p, tiles, warps)
                else:
                    fn = lambda: ohem_mod._ohem_impl(inp["x"], inp["t"], THRESH,  # noqa: E731
                                                     inp["min_kept"], 255, block_p, tiles,
                                                     warps)
                try:
                    with torch.no_grad():
                        t = bc.time_ms(fn, device, args.warmup, args.reps)
                except Exception as e:  # e.g. out of resources at a large tile
                    print(f"[sweep] {op} bp={block_p} tiles={tiles} warps={warps}: {e}",
                          file=sys.stderr)
                    continue
                recs.append(dict(base, variant=f"triton_fwd[bp={block_p},tiles={tiles},"
                                               f"warps={warps}]",
                                 median_ms=t["median_ms"], spread_ms=t["spread_ms"]))
    return recs


def main(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu" and not args.quick:
        print("no CUDA device: run with --quick for the CPU smoke", file=sys.stderr)
        return 2
    quick = args.quick
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    args.reps = args.reps if args.reps is not None else (2 if quick else 20)
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 2)
    variants = (args.variants.split(",") if args.variants
                else (["eager", "triton"] if quick else ["eager", "compile", "triton"]))
    for v in variants:
        if v not in VARIANTS:
            print(f"error: --variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})",
                  file=sys.stderr)
            return 2
    cases = QUICK_CASES if quick else FULL_CASES
    dtype = DTYPES[args.dtype]
    env = bc.environment(device)
    ceil = bc.ceilings(device, quick=quick)
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"kernels-{bc.device_slug(env['device'])}.jsonl")
    records = [dict(benchmark="ceiling", variant="copy", preset="-", **env,
                    gb_per_s=ceil["copy_gb_per_s"]),
               dict(benchmark="ceiling", variant=f"matmul_{ceil['matmul_dtype']}", preset="-",
                    **env, tflops=ceil["matmul_tflops"])]
    bc.append_jsonl(out, records)
    gen = torch.Generator(device=device).manual_seed(0)
    case_s = 0.0        # how long the last case took: is there time for another?
    for op in args.ops.split(","):
        for preset, shape in cases[op]:
            for layout in args.layouts.split(","):
                base = dict(benchmark=op, preset=preset, shape=list(shape), dtype=args.dtype,
                            layout=layout, **env, copy_gb_per_s=ceil["copy_gb_per_s"])
                if bc.seconds_left() < 1.5 * case_s + 5:
                    recs = [dict(base, variant=v, error="not measured: the stage's time ran "
                                 "out") for v in variants]
                    bc.append_jsonl(out, recs)
                    records += recs
                    continue
                t_case = time.perf_counter()
                inp = _inputs(op, shape, dtype, layout, device, gen)
                nbytes, formula = _bytes_model(op, shape, dtype)
                base.update(bytes_model=nbytes, bytes_formula=formula)
                eager_ms = {}
                steps = {}
                for rnd in range(args.rounds):
                    for variant in variants:      # the variants take turns, round by round
                        rec = dict(base, variant=variant, round=rnd, rounds=args.rounds,
                                   **VARIANTS[variant](op))
                        try:
                            if variant not in steps:
                                steps[variant] = _make_step(op, variant, inp)
                            step = steps[variant]
                            t = bc.time_ms(step, device, args.warmup, args.reps)
                            step.reset()     # old grads out of the baseline
                            rec.update(median_ms=t["median_ms"], spread_ms=t["spread_ms"],
                                       peak_mem_gb=bc.peak_extra_gb(step, device))
                            rec["gb_per_s"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
                            rec["frac_copy_bw"] = rec["gb_per_s"] / ceil["copy_gb_per_s"]
                            if variant == "eager":
                                eager_ms[rnd] = t["median_ms"]
                            if eager_ms.get(rnd):
                                rec["speedup_vs_eager"] = eager_ms[rnd] / t["median_ms"]
                        except Exception as e:  # torch.compile may not work everywhere
                            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                            print(f"[error] {op} {preset} {layout} {variant}: {rec['error']}",
                                  file=sys.stderr)
                        bc.append_jsonl(out, [rec])      # one by one: a cut run keeps these
                        records.append(rec)
                        print(f"{op} {preset} {layout} {variant} round {rnd}: "
                              + (f"{rec['median_ms']:.3f} ms" if "median_ms" in rec
                                 else rec["error"]), file=sys.stderr, flush=True)
                if args.sweep and not quick and preset == cases[op][0][0]:
                    recs = _sweep(op, inp, shape, device, env, args, base)
                    bc.append_jsonl(out, recs)
                    records += recs
                del inp, steps
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                case_s = time.perf_counter() - t_case
    print(f"\n## Triton loss kernels, forward + backward ({env['device']}, commit "
          f"{env['commit']}, torch {env['torch']}, triton {env['triton']})\n")
    print(f"Ceilings measured in this run: copy {ceil['copy_gb_per_s']:.1f} GB/s, "
          f"{ceil['matmul_dtype']} matmul {ceil['matmul_tflops']:.2f} TFLOP/s"
          + ("  (CPU smoke figures only)" if device.type == "cpu" else "") + "\n")
    print(bc.markdown_table(
        [r for r in records if r["benchmark"] != "ceiling"],
        ["benchmark", "preset", "layout", "variant", "round", "median_ms", "spread_ms",
         "gb_per_s", "frac_copy_bw", "speedup_vs_eager", "peak_mem_gb", "error"]))
    print(f"\nrecords appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
