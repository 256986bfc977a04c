#!/usr/bin/env bash
# The recipe trials of experiments/recipes/README.md: experiment=fmnist_cpu as it was before REPA
# was adopted into it (now: pass `~repa` for the trials' default) with one switch at a time, FID
# every 500 steps, on one prepared dir that also stores the images (REPA encodes them; the latents
# are the default's). Each trial goes through the heavy lock alone, so its step time is not shared
# with another job.
#   usage: experiments/recipes/trials.sh <name> [overrides ...]      (from the repo root)
#   env: ROOT (runs and data, default /work/runs), SEED (default 0), PY (python)
set -euo pipefail
name=$1; shift
ROOT=${ROOT:-/work/runs}; SEED=${SEED:-0}; PY=${PY:-python3}
HEAVY=${HEAVY:-$(dirname "$0")/../../../shared/tools/heavy}
run=recipes_${name}_s${SEED}
[ -f "$ROOT/outputs/train/$run/metrics.json" ] && { echo "$run: done already"; exit 0; }
"$HEAVY" env PYTHONUNBUFFERED=1 WANDB_MODE=disabled "$PY" -m ditlab.train experiment=fmnist_cpu \
  run_name="$run" seed="$SEED" paths.root_dir="$ROOT" \
  data.prepared_dir="$ROOT/data/fashion_mnist-small_kl-images" \
  callbacks.fid.every_n_steps=500 callbacks.checkpoint.every_n_train_steps=500 callbacks.checkpoint.keep_last=0 \
  logger=csv callbacks.progress=null "$@" > "$ROOT/$run.log" 2>&1
echo "$run: $(grep -o 'val/fid_clf[^,]*' "$ROOT/outputs/train/$run/metrics.json" | head -1)"
