#!/usr/bin/env bash
# The whole GPU round in one call on a lent GPU machine (../shared/GPU.md): build the
# extension for sm_90, run the gpu-marked tests, then every benchmark, twice where it
# matters; logs and JSON records under $OUT. Copy $OUT/*.jsonl into benchmarks/results/
# afterwards and commit them with the device and commit they name.
#
#   OUT=/some/dir bash benchmarks/gpu_round.sh [quick]
#
# "quick" skips the long throughput ladder (the R50 presets) for a short first look.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/cps_fast_gpu_round}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0          # tests/conftest.py defaults it to 1 (CPU machines)
export CPS_FAST_CUDA_ARCHS="${CPS_FAST_CUDA_ARCHS:-90}"
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, keep going, remember failures
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
    tail -n 25 "$OUT/$name.log"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" > "$OUT/versions.txt" 2>&1
run build pip install --no-build-isolation --no-deps -e .
cp build/ptxas_summary.txt "$OUT/" 2>/dev/null
run tests_gpu python3 -m pytest -q -m gpu -p no:cacheprovider
run kernels python3 benchmarks/kernels.py --out "$OUT/kernels.jsonl"
run ops_backends python3 benchmarks/ops_backends.py --out "$OUT/ops_backends.jsonl"
if python3 -c "import nvidia.dali" 2>/dev/null; then
    run data_pipeline python3 benchmarks/data_pipeline.py --threads 4,8,16 --out "$OUT/data_pipeline.jsonl"
fi
if [ "${1:-}" = "quick" ]; then
    run throughput python3 benchmarks/throughput.py --presets voc --steps 10 --reps 2 \
        --variants eager_amp_cl,fused,graph_fused --out "$OUT/train_step.jsonl"
else
    run throughput python3 benchmarks/throughput.py --out "$OUT/train_step.jsonl"
fi
exit $status
