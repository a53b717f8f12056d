#!/usr/bin/env bash
# The whole GPU round in one call on a briefly lent GPU machine: build the
# extension for sm_90, run the gpu-marked tests, then the benchmarks, most important first,
# each under a time limit inside one overall budget, so that one call of the device tool
# (at most 600 s, out of a session's ~15 min of device time) brings back the headline even
# if the tail is cut. Every benchmark appends its JSON records one by one under $OUT; copy
# $OUT/*.jsonl into benchmarks/results/ afterwards and commit them (they name the device
# and the commit).
#
#   OUT=/some/dir BUDGET_S=540 bash benchmarks/gpu_round.sh [quick|full]
#
# Order: build -> gpu tests -> VOC ladder with the per-phase profile (the issue's targets)
# -> torch.compile modes on VOC -> kernel and backend benchmarks -> Cityscapes ladder ->
# DALI (when installed). "quick" stops after the VOC ladder; "full" also runs max-autotune.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/cps_fast_gpu_round}"
BUDGET_S="${BUDGET_S:-540}"
MODE="${1:-}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0          # tests/conftest.py defaults it to 1 (CPU machines)
export CPS_FAST_CUDA_ARCHS="${CPS_FAST_CUDA_ARCHS:-90}"
export CPS_FAST_BUILD_JOBS="${CPS_FAST_BUILD_JOBS:-16}"
START=$SECONDS
status=0
run() {  # run NAME LIMIT_S CMD...: log to $OUT/NAME.log under min(LIMIT, what is left)
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET_S - (SECONDS - START) - 5 ))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (budget spent)" | tee -a "$OUT/round.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/round.txt"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/round.txt"
    [ $rc -eq 0 ] || status=1
    tail -n 30 "$OUT/$name.log"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    > "$OUT/versions.txt" 2>&1
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null
TP="python3 benchmarks/throughput.py --steps 15 --reps 2 --profile $OUT/profiles"
run build 150 pip install --no-build-isolation --no-deps -e .
cp build/ptxas_summary.txt "$OUT/" 2>/dev/null
run tests_gpu 180 python3 -m pytest -q -m gpu -p no:cacheprovider -rs
run voc_ladder 200 $TP --presets voc --variants eager_fp32,eager_amp,eager_amp_cl,fused,graph_fused \
    --out "$OUT/train_step.jsonl"
[ "$MODE" = "quick" ] && exit $status
run voc_compile 240 $TP --presets voc --variants compile_default,compile_reduce_overhead,ddp_ws1 \
    --out "$OUT/train_step.jsonl"
run kernels 90 python3 benchmarks/kernels.py --out "$OUT/kernels.jsonl"
run city_ladder 200 $TP --presets city --variants eager_amp_cl,fused,graph_fused \
    --out "$OUT/train_step.jsonl"
run ops_backends 90 python3 benchmarks/ops_backends.py --out "$OUT/ops_backends.jsonl"
if python3 -c "import nvidia.dali" 2>/dev/null; then
    run data_pipeline 120 python3 benchmarks/data_pipeline.py --threads 4,8,16 \
        --out "$OUT/data_pipeline.jsonl"
    run voc_dali 150 $TP --presets voc --variants fused,graph_fused --data dali \
        --out "$OUT/train_step.jsonl"
fi
if [ "$MODE" = "full" ]; then
    run voc_max_autotune 600 $TP --presets voc --variants compile_max_autotune \
        --out "$OUT/train_step.jsonl"
fi
exit $status
