"""``ditlab export ckpt=... out=...``: a complete diffusers folder (``ditlab.pipelines.export``), or with
``what=transformer`` the transformer alone (a ``DiTTransformer2DModel`` folder)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ditlab.pipelines.export import export_pipeline, export_transformer
from ditlab.runtime.errors import INPUT_ERRORS, exit_on_error, hydra_command

WHAT = ("pipeline", "transformer")


def export(cfg: DictConfig) -> Path:
    if cfg.what not in WHAT:
        raise ValueError(f"what={cfg.what!r}; expected one of {WHAT}")
    if cfg.what == "transformer":
        out = export_transformer(cfg.ckpt, cfg.out, cfg.ema, cfg.family, cfg.num_heads)
    else:
        reading = dict(family=cfg.family, num_heads=cfg.num_heads, latent_stats=cfg.latent_stats)
        out = export_pipeline(cfg.ckpt, cfg.out, cfg.ema, cfg.vae_path, **reading)
    print(f"exported to {out}")
    return out


@hydra_command("ditlab.export", "export")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.export", export, cfg, errors=(*INPUT_ERRORS, FileExistsError))


if __name__ == "__main__":
    main()
