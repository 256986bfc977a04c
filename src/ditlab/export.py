"""``ditlab export ckpt=... out=...``: a complete diffusers folder (``ditlab.interop.pipeline_export``)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ditlab.cli import exit_on_error


def run(cfg: DictConfig) -> Path:
    from ditlab.interop.pipeline_export import export_pipeline

    out = export_pipeline(cfg.ckpt, cfg.out, cfg.ema, cfg.vae_path)
    print(f"exported to {out}")
    return out


@hydra.main(version_base="1.3", config_path=str(Path(__file__).parent / "conf"), config_name="export")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.export", run, cfg, errors=(ValueError, FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    main()
