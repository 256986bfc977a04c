#!/usr/bin/env bash
# The issue-12 GPU measurements in one device call, most important first; each stage has its own
# time limit and the whole script a deadline (BUDGET seconds), so one failure or hang costs only its
# stage. Logs land in $OUT/<stage>.log; the tables and PASS/FAIL lines are echoed.
#   run from the repo root on the GPU machine, with the wheels of .whl/ (see README.md here)
set -u
${PIP_INSTALL:-python3 -m pip install} -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1  # absolute: the sharded check runs elsewhere
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
deadline=$((SECONDS + ${BUDGET:-540}))
BIG=${BIG:-dit_xl2}; SIZE=${SIZE:-32}; SMALL_SIZE=${SMALL_SIZE:-8}

stage() {
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 40 ]; then echo "=== $name: SKIPPED (deadline)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? after $((SECONDS - start)) s"
  grep -E '^\||^# |^PASS|^FAIL|^objective|^GaussianDiffusion|^FlowMatching|Error|error:' "$OUT/$name.log" | grep -v Warning | tail -25
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__)"
date -u
stage xl2_b32 170 python3 -m ditlab.bench train --models "$BIG" --size "$SIZE" --batches 32
stage sharded_check 150 python3 experiments/benchmarks/gpu_sharded_check.py
stage fmnist_b256 80 python3 -m ditlab.bench train --models dit_fmnist --size "$SMALL_SIZE" --batches 256 --steps 200 --warmup 20
stage xl2_b256_ac 130 python3 -m ditlab.bench train --models "$BIG" --size "$SIZE" --batches 256 --ac 1 --official off --steps 5
stage xl2_b32_fsdp 130 python3 -m ditlab.bench train --models "$BIG" --size "$SIZE" --batches 32 --trainer fsdp --override trainer.devices=1 --official off
stage xl2_b128 120 python3 -m ditlab.bench train --models "$BIG" --size "$SIZE" --batches 128 --official off
stage xl2_b32_profile 120 python3 -m ditlab.bench train --models "$BIG" --size "$SIZE" --batches 32 --official off --steps 3 --profile "$OUT"
stage xl2_sampling 100 python3 -m ditlab.bench sampling --model "$BIG" --size "$SIZE" --batch 32 --samplers ddpm:250,dpmpp_2m:20
stage data_fmnist 60 python3 -m ditlab.bench data --size "$SMALL_SIZE" --batch 256 --workers 4 --count 20000
date -u
