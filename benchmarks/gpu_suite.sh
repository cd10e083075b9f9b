#!/usr/bin/env bash
# The GPU suite in one call. Each step writes its JSON and log under OUT, then OUT/summary.md:
#   loss    benchmarks/loss.py, 0.5B head shape: plain CE vs dense Q vs fused Q (eager and compiled)
#   train   benchmarks/train.py, 0.5B, 2 x 8192, gradient checkpointing, bf16: plain CE vs fused
#           Target-SFT, then padded vs packed
#   priors  benchmarks/priors.py, hf engine on a random 1.5B model: tokens/s and MFU
#   pytest  pytest -m gpu (tests/test_gpu.py)
#
#   benchmarks/gpu_wheels.sh                # here, once: what the bare GPU machine lacks -> .whl/
#   benchmarks/gpu_suite.sh [OUT]           # there, one H100 or H200: about 6 minutes
#   benchmarks/gpu_suite.sh --smoke [OUT]   # anywhere, CPU, toy sizes: the default test suite runs this
#
# Every step runs even if one before it failed; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
OUT="${1:-${OUT:-gpu-suite-out}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-suite-site \
    .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/gpu-suite-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

step() {  # step NAME COMMAND...: run it, keep its log, record status and seconds
  local name=$1 started=$SECONDS status
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  status=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - started))" >> "$OUT/steps.tsv"
}

if (( SMOKE )); then
  step loss "$PY" benchmarks/loss.py --tokens 64 --hidden 16 --vocab 256 --reps 1 --warmup 1 --json "$OUT/loss.json"
  step train_loss "$PY" benchmarks/train.py --shape tiny --batch 2 --seq 64 --grad-ckpt --dtype bf16 --reps 1 \
    --warmup 1 --json "$OUT/train_loss.json"
  step train_packing "$PY" benchmarks/train.py --shape tiny --compare packing --batch 4 --seq 64 --grad-ckpt \
    --dtype bf16 --reps 1 --warmup 1 --json "$OUT/train_packing.json"
  step priors "$PY" benchmarks/priors.py --random-model tiny --synthetic 64 --examples 16 --dtype fp32 --skip-vllm \
    --json "$OUT/priors.json"
  step pytest "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests/test_gpu.py
else
  step loss "$PY" benchmarks/loss.py --device cuda --tokens 16384 --hidden 896 --vocab 151936 --dtype bf16 --compiled \
    --triton --chunk-sizes 4096 8192 --anchors --json "$OUT/loss.json"
  step train_loss "$PY" benchmarks/train.py --device cuda --shape 0.5b --batch 2 --seq 8192 --grad-ckpt --dtype bf16 \
    --json "$OUT/train_loss.json"
  step train_packing "$PY" benchmarks/train.py --device cuda --shape 0.5b --compare packing --batch 8 --seq 8192 \
    --grad-ckpt --dtype bf16 --json "$OUT/train_packing.json"
  step priors "$PY" benchmarks/priors.py --device cuda --random-model 1.5b --synthetic 1024 --examples 1024 \
    --skip-vllm --json "$OUT/priors.json"
  step pytest "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
fi
"$PY" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
! cut -f2 "$OUT/steps.tsv" | grep -qv '^0$'
