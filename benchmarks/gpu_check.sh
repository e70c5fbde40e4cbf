#!/usr/bin/env bash
# Everything that needs a GPU, run from the repo root on the device machine. Results land in
# $OUT (or ./gpu-results). The device tool allows 10 minutes a call, so the work is in stages;
# the machine stays warm between calls and keeps the build:
#
#   bash benchmarks/gpu_check.sh build tests     # build with the CUDA kernels, GPU tests, all tests
#   bash benchmarks/gpu_check.sh micro e2e       # microbenchmarks + kernel timing vs floor, e2e
#   bash benchmarks/gpu_check.sh methods tokens  # e2e rows of every method, token-level rows
#   bash benchmarks/gpu_check.sh                 # all of it (when time allows)
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=${*:-build tests micro e2e methods tokens}
has() { [[ " $STAGES " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if has build; then
  echo "== build"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  python3 -m eekernels env | tee -a "$OUT/gpu.txt"
fi
if has tests; then
  echo "== GPU tests"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  echo "== all tests on the GPU machine"
  python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tail -5 | tee -a "$OUT/gpu_tests.log"
fi
if has micro; then
  echo "== microbenchmarks (pytest-benchmark)"
  python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_*.py \
    --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/bench_micro.json" 2>&1 | tail -60
  echo "== exit_head timing vs floor"
  python3 benchmarks/exit_head_gpu.py --out "$OUT"
  [ -f benchmarks/tokens_gpu.py ] && python3 benchmarks/tokens_gpu.py --out "$OUT"
fi
PROFILES=""
for p in benchmarks/profiles/*.json; do [ -f "$p" ] && PROFILES="$PROFILES --measured-profile $p"; done
if has e2e; then
  echo "== end-to-end: BERT-base shape, fp16, seq 128, B = 1..512, 10% and 20% exit per layer + measured profiles"
  python3 benchmarks/e2e.py --out "$OUT" --repeats 20 --methods early-exit,fixed-capacity $PROFILES
  echo "== end-to-end, the fixed-capacity engine captured as one CUDA graph (torch.cond -> IF nodes), B <= 32"
  mkdir -p "$OUT/graphed"
  python3 benchmarks/e2e.py --out "$OUT/graphed" --repeats 20 --batch-sizes 1,8,32 --methods graphed $PROFILES
fi
if has methods; then
  echo "== end-to-end, every sample-level method on the same profiles"
  mkdir -p "$OUT/methods"
  python3 benchmarks/e2e.py --out "$OUT/methods" --repeats 10 --batch-sizes 1,8,32,128,512 \
    --methods early-exit,past-future,consistentee,cascadebert $PROFILES
fi
if has tokens; then
  echo "== token-level: HashEE and MPEE rows, seq 128/512, B 32/128; HashEE single-layer study"
  mkdir -p "$OUT/tokens"
  python3 benchmarks/e2e.py --out "$OUT/tokens" --repeats 10 --batch-sizes 1 --exit-fracs 0.2 \
    --token-methods hashee,mpee
  python3 benchmarks/hashee_gpu.py --out "$OUT/tokens" --repeats 20
fi
