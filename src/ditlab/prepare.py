"""``python -m ditlab.prepare data=<dataset> vae=<vae>``: images -> VAE latent shards (+ meta.json).

A rerun skips every split (and the small VAE) already complete. With several processes
(``torchrun --nproc_per_node=N -m ditlab.prepare ...``) each rank encodes every N-th image and
writes its own chunk files; rank 0 merges the indexes. The work is ``ditlab.data.preparation``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ditlab.cli import exit_on_error, hydra_command
from ditlab.data.preparation import prepare_dataset


@hydra_command("ditlab.prepare", "prepare")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.prepare", prepare_dataset, cfg)


if __name__ == "__main__":
    main()
