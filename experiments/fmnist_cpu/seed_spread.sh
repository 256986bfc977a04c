#!/usr/bin/env bash
# fid_clf of make train's final EMA checkpoint over 5 sampling seeds, its own protocol (Heun 13, guidance 4.0 on [0, 500], balanced labels)
set -u
cd "${1:?usage: seed_spread.sh <fresh clone after make train>}"
RUN=$(ls -d outputs/train/fmnist_cpu_* | head -1)
echo "$(date +%T) run $RUN; $(lscpu | grep 'Model name' | sed 's/  */ /g')"
for s in 1 2 3 4 5; do
  start=$(date +%s)
  .venv/bin/python -m ditlab.sample ckpt=$RUN/checkpoints/last.ckpt num_samples=1500 labels=balanced seed=$s out=/tmp/spread/s$s 2>&1 | tail -1
  .venv/bin/python -m ditlab.evaluate samples=$(ls /tmp/spread/s$s/samples_*.npz) reference=data/fashion_mnist-small_kl-images extractor=clf metrics=[fid] progress=false 2>&1 | tail -3
  echo "$(date +%T) seed $s done in $(( $(date +%s) - start )) s"
done
