"""``ditlab export ckpt=... out=...``: a complete diffusers folder (``ditlab.interop.pipeline_export``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ditlab.cli import INPUT_ERRORS, exit_on_error, hydra_command


def run(cfg: DictConfig) -> Path:
    from ditlab.interop.pipeline_export import export_pipeline

    out = export_pipeline(cfg.ckpt, cfg.out, cfg.ema, cfg.vae_path)
    print(f"exported to {out}")
    return out


@hydra_command("ditlab.export", "export")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.export", run, cfg, errors=(*INPUT_ERRORS, FileExistsError))


if __name__ == "__main__":
    main()
