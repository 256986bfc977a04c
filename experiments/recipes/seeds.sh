#!/usr/bin/env bash
# Issue 28's 3-seed rows (experiments/recipes/README.md, "Three seeds"): each row one Hydra sweep over
# seed=0,1,2 at `make train`'s own config and budget (experiment=fmnist_cpu: 1000 steps, REPA 512,
# the final FID of 1500 samples with its interval and floor), plus the fixed-timestep validation loss
# on 20 held-out batches at steps 500 and 1000 (its own noise: the training streams are unchanged).
# One prepared dir for every row (the default's, with the images REPA encodes; made by the first run if
# missing), also for the rows without REPA (whose own default dir would hold a second VAE), one sweep at a
# time through the heavy lock, so step times are not shared with another job.
#   usage: experiments/recipes/seeds.sh <row> [overrides ...]      (from the repo root)
#   then:  python -m ditlab.report $ROOT/multirun/seeds --out experiments/recipes/seeds
#   env: ROOT (runs and data, default /work/runs), SEEDS (default 0,1,2), PY (python)
set -euo pipefail
row=$1; shift
ROOT=${ROOT:-/work/runs}; SEEDS=${SEEDS:-0,1,2}; PY=${PY:-python3}
HEAVY=${HEAVY:-$(dirname "$0")/../../../shared/tools/heavy}
sweep=$ROOT/multirun/seeds/$row
[ -f "$sweep/finished" ] && { echo "$row: done already"; exit 0; }
"$HEAVY" env PYTHONUNBUFFERED=1 WANDB_MODE=disabled "$PY" -m ditlab.train -m experiment=fmnist_cpu \
  seed="$SEEDS" paths.root_dir="$ROOT" data.prepared_dir="$ROOT/data/fashion_mnist-small_kl-images" \
  hydra.sweep.dir="$sweep" logger=csv callbacks.progress=null \
  trainer.limit_val_batches=20 trainer.val_check_interval=500 "$@" > "$ROOT/seeds_$row.log" 2>&1
touch "$sweep/finished"
grep -h -o '"val/fid_clf": [0-9.]*' "$sweep"/job*/metrics.json | sed "s|^|$row: |"
