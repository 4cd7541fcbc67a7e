#!/usr/bin/env bash
# The GPU checks, in one go: build the CUDA extension, run the GPU-marked tests with real
# Triton, then the kernel benchmark. Logs and results go to $OUT (default bench/results).
#   bash bench/run_on_gpu.sh [tests|bench|all] [extra bench_cos_nce.py args...]
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
start=$SECONDS
python3 -c "from lrc_kernels.ops import cos_nce_cuda as c; c.extension(); print('CUDA extension built')" 2>&1 | tail -40
echo "build: $((SECONDS - start)) s"
if [[ $what == tests || $what == all ]]; then
  start=$SECONDS
  workers=$(python3 -c "import importlib.util as u; print('-n 8' if u.find_spec('xdist') else '')")
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -m gpu $workers -p no:cacheprovider tests 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -60
  echo "tests: $((SECONDS - start)) s"
fi
if [[ $what == bench || $what == all ]]; then
  timeout "${BENCH_TIMEOUT:-400}" python3 bench/bench_cos_nce.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -80
fi
