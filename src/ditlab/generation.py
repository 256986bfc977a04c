"""Everything needed to generate from a checkpoint: network, objective, codec and class count.

Reads a ditlab Lightning checkpoint (the resolved run config is inside it) or an official DiT
checkpoint (paired with the SD VAE it was trained with). Always on the CPU first, weights only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ditlab.diffusion import CFGModel, create_diffusion
from ditlab.models.official import load_official_checkpoint


@dataclass
class Generator:
    net: torch.nn.Module
    objective: object
    codec: torch.nn.Module
    num_classes: int
    latent_shape: tuple[int, int, int]
    source: str

    def guided(self, cfg_scale: float, guided_channels: int | None = None, interval=None) -> CFGModel:
        return CFGModel(
            self.net,
            cfg_scale,
            null_label=self.num_classes,
            in_channels=self.latent_shape[0],
            guided_channels=guided_channels,
            interval=None if interval is None else tuple(interval),
        )

    def check_labels(self, labels: torch.Tensor) -> None:
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise ValueError(f"label {int(bad[0])} is out of range; this model has classes 0..{self.num_classes - 1}")

    def to(self, device):
        self.net.to(device)
        self.codec.to(device)
        return self


def load_network(ckpt: str | Path, ema: bool = True):
    """(net, objective, run config or None) from a ditlab ``.ckpt`` or an official DiT file."""
    from hydra.utils import instantiate

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={str(ckpt)!r} does not exist; expected a ditlab .ckpt or an official DiT .pt")
    if path.suffix != ".ckpt":
        net = load_official_checkpoint(path)
        return net, create_diffusion(learn_sigma=net.learn_sigma), None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config_yaml = checkpoint.get("ditlab", {}).get("config_yaml")
    if not config_yaml:
        raise ValueError(f"{str(path)!r} is not a ditlab checkpoint (no stored run config)")
    cfg = OmegaConf.create(config_yaml)
    net = instantiate(cfg.model)
    prefix = "ema.net." if ema else "net."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state, strict=True)
    return net.eval(), instantiate(cfg.diffusion.objective), cfg


def load_generator(ckpt: str | Path, ema: bool = True, vae: str | None = None) -> Generator:
    """A ditlab ``.ckpt`` (EMA weights unless ``ema=False``) or an official DiT ``.pt``/``.safetensors``,
    with the codec that decodes its latents (the run's own, or ``vae``: a hub id or local dir)."""
    from ditlab.data.shards import read_meta
    from ditlab.vae import SD_SCALE_FACTOR, PretrainedVAE, codec_from_meta

    net, objective, cfg = load_network(ckpt, ema)
    if cfg is None:
        codec = PretrainedVAE(vae or "stabilityai/sd-vae-ft-ema", SD_SCALE_FACTOR)
        source = "official DiT checkpoint"
    else:
        prepared = cfg.data.prepared_dir
        codec = PretrainedVAE(vae, SD_SCALE_FACTOR) if vae else codec_from_meta(read_meta(prepared), prepared)
        source = f"ditlab checkpoint, {'EMA' if ema else 'raw'} weights"
    return Generator(
        net, objective, codec.eval(), net.num_classes, (net.in_channels, net.input_size, net.input_size), source
    )
