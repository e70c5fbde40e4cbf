#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the device tool (run from the repo root):
#   build with the CUDA kernels, the GPU tests, the microbenchmarks, the timing script.
# Results land in $OUT (or ./gpu-results). Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
echo "== build"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -m eekernels env | tee -a "$OUT/gpu.txt"
echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "== all tests on the GPU machine"
python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tail -5 | tee -a "$OUT/gpu_tests.log"
echo "== microbenchmarks (pytest-benchmark)"
python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_exit_head.py benchmarks/test_bench_compaction.py \
  --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/bench_micro.json" 2>&1 | tail -40
echo "== exit_head timing vs floor"
python3 benchmarks/exit_head_gpu.py --out "$OUT"
echo "== end-to-end: BERT-base shape, fp16, seq 128, B = 1..512, 10% and 20% exit per layer + measured profiles (benchmarks/profiles)"
PROFILES=""
for p in benchmarks/profiles/*.json; do [ -f "$p" ] && PROFILES="$PROFILES --measured-profile $p"; done
python3 benchmarks/e2e.py --out "$OUT" --repeats 20 $PROFILES
