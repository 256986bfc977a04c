"""``python -m ditlab.prepare data=<dataset> vae=<vae>``: images -> VAE latent shards, FID reference
statistics and meta.json in ``data.prepared_dir`` (the stage is ``ditlab.pipelines.prepare``).

A rerun skips every part already complete. With several processes (``torchrun
--nproc_per_node=N -m ditlab.prepare ...``) each rank encodes every N-th image and writes its own
chunk files; rank 0 merges the indexes.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ditlab.pipelines.prepare import prepare_from_config
from ditlab.runtime.errors import exit_on_error, hydra_command

__all__ = ["main", "prepare_from_config"]


@hydra_command("ditlab.prepare", "prepare")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.prepare", prepare_from_config, cfg)


if __name__ == "__main__":
    main()
