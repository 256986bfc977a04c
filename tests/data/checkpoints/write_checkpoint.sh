#!/bin/bash
# Write a tiny checkpoint of one format with the code of the commit that made it:
#   tests/data/checkpoints/write_checkpoint.sh <format dir> <commit>     (from the repository root)
# The commit is checked out in a temporary worktree (/tmp/ckpt-old-<commit>, removed afterwards) and
# runs the tests' tiny configs of its time: a 3-class folder of 8x8 RGB images (helpers.make_image_folder's,
# 16 a class) prepared with the identity VAE into ./latents (relative: a test gives it back), then
# 2 training steps of a DiT of hidden 8, depth 1, 2 heads, patch 2, whose last.ckpt is copied here.
# Grid guidance 3.0 (on t in [0, 600] where the format had the interval) and a FID of 6 samples make
# the stored values differ from the defaults, so that the test sees them read. PY: the python to run
# (default /work/main/.venv/bin/python), with the commit's src first on PYTHONPATH.
set -euo pipefail
FORMAT=$1
REPO=$(git rev-parse --show-toplevel)
COMMIT=$(git rev-parse --short "$2")
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
WORKTREE=/tmp/ckpt-old-$COMMIT
OUT=$(mktemp -d /tmp/ckpt-run-XXXXXX)
git worktree add --detach "$WORKTREE" "$COMMIT" >/dev/null
trap 'git -C "$REPO" worktree remove --force "$WORKTREE"; rm -rf "$OUT"' EXIT
export PYTHONPATH=$WORKTREE/src WANDB_MODE=offline OMP_NUM_THREADS=1
cd "$OUT"
"$PY" - <<'EOF'
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for k, cls in enumerate(("cat", "dog", "fox")):
    (Path("images") / cls).mkdir(parents=True, exist_ok=True)
    for i in range(16):
        base = np.array([60 * k, 255 - 60 * k, 128], dtype=np.float64)
        arr = np.clip(base + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(Path("images") / cls / f"{i:03d}.png")
EOF
FOLDER="data=folder data.source.root=$OUT/images data.source.image_size=8 data.source.val_fraction=0.25 vae=identity
  data.prepared_dir=latents data.reference.extractor=null"
TINY="model.hidden_size=8 model.depth=1 model.num_heads=2 model.patch_size=2"
SHAPE="model.in_channels=3 model.num_classes=3 model.input_size=8"  # before the model followed the data
RUN="data=folder data.prepared_dir=latents data.module.batch_size=8 sampler.steps=4 trainer.max_steps=2
  trainer.log_every_n_steps=1 paths.root_dir=$OUT prepare_if_missing=false callbacks.throughput.window_steps=2"
case $FORMAT in
  f0_first_layout)      # before the sampler registry and experiment=smoke: the tests' overrides of then
    PREPARE="$FOLDER num_workers=0 progress=false"
    TRAIN="$RUN data.module.num_workers=0 model=dit_tiny $SHAPE $TINY sampler=ddim50 callbacks=minimal
      callbacks.sample_grid.per_class=2 callbacks.sample_grid.every_n_steps=0 callbacks.sample_grid.cfg_scale=3.0
      logger=csv callbacks.progress.refresh_rate=0" ;;
  f0_sampler_registry)  # the grid's cfg_scale, the FID callback's own settings
    PREPARE="$FOLDER encode.num_workers=0 encode.progress=false"
    TRAIN="experiment=smoke $RUN $SHAPE $TINY callbacks.sample_grid.cfg_scale=3.0
      callbacks.fid.num_samples=6 callbacks.fid.batch_size=6" ;;
  f0_nonfinite)         # + the non-finite state; the grid's guidance_interval
    PREPARE="$FOLDER encode.num_workers=0 encode.progress=false"
    TRAIN="experiment=smoke $RUN $SHAPE $TINY callbacks.sample_grid.cfg_scale=3.0
      callbacks.sample_grid.guidance_interval=[0,600] callbacks.fid.num_samples=6 callbacks.fid.batch_size=6" ;;
  f0_guidance_node)     # one guidance node, one fid_protocol node
    PREPARE="$FOLDER encode.num_workers=0 encode.progress=false"
    TRAIN="experiment=smoke $RUN $SHAPE $TINY guidance.scale=3.0 guidance.interval=[0,600]
      fid_protocol.num_samples=6 fid_protocol.batch_size=6" ;;
  f0_travelling|f1_*)   # the model follows the data; the codec and class names travel (f1: in the record)
    PREPARE="$FOLDER encode.num_workers=0 encode.progress=false"
    TRAIN="experiment=smoke $RUN $TINY guidance.scale=3.0 guidance.interval=[0,600]
      fid_protocol.num_samples=6 fid_protocol.batch_size=6" ;;
  *) echo "unknown format $FORMAT" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086  # the override lists are word lists
"$PY" -m ditlab.prepare $PREPARE hydra.run.dir="$OUT/prepare_run"
# shellcheck disable=SC2086
"$PY" -m ditlab.train $TRAIN hydra.run.dir="$OUT/run"
mkdir -p "$HERE/$FORMAT"
cp "$OUT/run/checkpoints/last.ckpt" "$HERE/$FORMAT/last.ckpt"
echo "$HERE/$FORMAT/last.ckpt: $(stat -c %s "$HERE/$FORMAT/last.ckpt") bytes, written by $COMMIT"
