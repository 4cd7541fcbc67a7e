#!/usr/bin/env bash
# One device-machine call: GPU tests (real Triton, the CUDA extension, the trainer on CUDA),
# the end-to-end throughput benchmark, and short SNLI runs (teacher fine-tune, LRC-BERT
# distillation) that time the trainer on real data. Everything lands in $OUT.
#   [TESTS=0] [BENCH=0] [SNLI=0] bash scripts/gpu_check.sh   (=0 skips that part; expects .whl/ with the
#   datasets wheels and runs/carry/ with minilm_fp16/ and snli.tgz; see docs/results.md)
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/data && tar xzf runs/carry/snli.tgz -C /tmp/data
start=$SECONDS
if [[ ${TESTS:-1} != 0 ]]; then
  OUT=$OUT TEST_TIMEOUT=${TEST_TIMEOUT:-200} bash bench/run_on_gpu.sh tests > "$OUT/gpu-tests-run.log" 2>&1
  tail -4 "$OUT/gpu-tests-run.log"; echo "[tests done at $((SECONDS - start)) s]"
fi
if [[ ${BENCH:-1} != 0 ]]; then
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-200}" python3 bench/bench_distill.py ${BENCH_ARGS:-} --out "$OUT" > "$OUT/bench_distill.log" 2>&1
  grep -E "samples/s|inference|wrote|Error" "$OUT/bench_distill.log"; echo "[bench done at $((SECONDS - start)) s]"
fi
if [[ ${SNLI:-1} == 0 ]]; then echo "[all done at $((SECONDS - start)) s]"; exit 0; fi
common=(--task snli --data-dir /tmp/data/snli --precision bf16 --max-length 0 --limit-eval 2000 --eval-batch-size 256
        --no-tensorboard --save-steps 100000 --logging-steps 50)
s=$SECONDS
timeout 150 python3 -m lrc_bert finetune "${common[@]}" --model runs/carry/minilm_fp16 --output /tmp/teacher \
  --max-steps 400 --batch-size 32 --eval-steps 100000 > "$OUT/snli-teacher.log" 2>&1
echo "teacher 400 steps: $((SECONDS - s)) s"; tail -1 "$OUT/snli-teacher.log"
# The paper's shapes (B = 16, L = 128) on real data, eager and with the step as a CUDA graph.
for mode in eager graphs; do
  s=$SECONDS
  timeout 200 python3 -m lrc_bert distill "${common[@]}" --max-length 128 --batch-size 16 \
    --teacher /tmp/teacher/model --output "/tmp/student-$mode" --max-steps 1500 --learning-rate 1e-4 \
    --eval-steps 100000 --logging-steps 100 $([[ $mode == graphs ]] && echo --cuda-graphs) > "$OUT/snli-$mode.log" 2>&1
  echo "student B=16 L=128 $mode, 1500 steps: $((SECONDS - s)) s"; tail -1 "$OUT/snli-$mode.log"
  cp "/tmp/student-$mode/metrics.jsonl" "$OUT/snli-$mode-metrics.jsonl" 2>/dev/null
  python3 scripts/train_rate.py "$OUT/snli-$mode-metrics.jsonl" 16
done
echo "[all done at $((SECONDS - start)) s]"
