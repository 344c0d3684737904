#!/usr/bin/env bash
# The GPU check (issue 19), on a CUDA machine with PyTorch and Triton but no package registry.
#   here:  scripts/gpu-wheels.sh          # the wheels the GPU image lacks, into .whl/
#   there: bash scripts/gpu-check.sh      # <= 8 minutes; logs and summary.txt in $OUT (or gpu-check-out/)
# Steps: kernels vs the eager twin on CUDA (fp32, bf16); the suite's cuda-parametrized tests;
# bench kernels (TopK 16k/64k, batch 4096, d 768); a cache on the GPU, then a 20 M-token TopK
# training run from it (tokens/s, data-wait fraction); bench cache (caching vs forward-only).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export WORKBENCH_HOME=${WORKBENCH_HOME:-/tmp/workbench-home}
if compgen -G ".whl/*.whl" >/dev/null; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
WB=("${PYTHON:-python3}" -m app.cli)
# DEVICE=cpu QUICK=1 rehearses the script here at toy sizes (every flag and step, no GPU numbers).
DEVICE=${DEVICE:-cuda}
if [[ ${QUICK:-0} == 1 ]]; then
  LATENTS=(1024 2048) BATCH=512 DIN=64 CACHE_TOKENS=20000 TRAIN_TOKENS=40000 TRAIN_LATENTS=1024 BENCH_TOKENS=8192
else
  LATENTS=(16384 65536) BATCH=4096 DIN=768 CACHE_TOKENS=2000000 TRAIN_TOKENS=20000000 TRAIN_LATENTS=16384
  BENCH_TOKENS=262144
fi
RUNS=/tmp/gpu-check-runs
rm -rf "$RUNS"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name: $*"
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$SUMMARY"
  tr '\r' '\n' <"$OUT/$name.log" | grep -v '^train\|it/s\]$' | tail -n 30
}

step env 60 python3 -c "
import torch, triton
from workbench import devices
d = devices.resolve_device('auto')
print('torch', torch.__version__, 'triton', triton.__version__, 'device', devices.describe(d))
assert '$DEVICE' == 'cpu' or d.type == 'cuda', 'auto did not pick the GPU'"
PYTEST=("${PYTHON:-python3}" -m pytest -o addopts= -q -p no:cacheprovider)
step kernels 120 "${PYTEST[@]}" tests/test_kernels_device.py -k "$DEVICE"
step cuda-tests 150 "${PYTEST[@]}" tests -k "cuda" \
  --ignore=tests/test_explorer.py --ignore=tests/test_explorer_browser.py --ignore=tests/test_notebooks.py \
  --ignore=tests/test_static.py --ignore=tests/test_kernels_device.py
step bench-kernels 120 "${WB[@]}" bench kernels --device "$DEVICE" --arch topk --n-latents "${LATENTS[@]}" \
  --batch-size "$BATCH" --d-in "$DIN" --k 32 --reps 5
step cache 90 "${WB[@]}" cache --device "$DEVICE" --model-dtype bfloat16 --dtype bfloat16 \
  --tokens "$CACHE_TOKENS" --batch-size 256 --out "$RUNS/cache" --json
step train 120 "${WB[@]}" train --device "$DEVICE" --cache "$RUNS/cache" --arch topk --k 32 \
  --n-latents "$TRAIN_LATENTS" --tokens "$TRAIN_TOKENS" --batch-size "$BATCH" --out "$RUNS/train" --json
step bench-cache 60 "${WB[@]}" bench cache --device "$DEVICE" --model-dtype bfloat16 --tokens "$BENCH_TOKENS"
cat "$SUMMARY"
