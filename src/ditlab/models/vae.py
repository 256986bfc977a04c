"""Image <-> latent codecs: a pretrained diffusers AutoencoderKL, the identity (pixel space), and the
architecture of the small KL autoencoder that ``prepare`` trains on the dataset itself when no
pretrained VAE fits (its training loop is ``ditlab.pipelines.fit_vae``).

Convention (EDM2-style): shards hold the RAW posterior (mean, std) of ``encode``; the model works on
``scale_factor * z`` with z sampled from that posterior; ``decode`` takes model-space latents. A
pretrained codec may also normalise each channel by the dataset's latent statistics (VA-VAE's
convention, LightningDiT's ``latent_norm``): the model then works on ``(z - mean) / std *
scale_factor``, per channel (``latent_stats``: the mean and std, as plain lists in the codec's
record, so that prepare, training, the checkpoint and sampling all hold the same numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

SD_SCALE_FACTOR = 0.18215  # stabilityai/sd-vae-ft-{ema,mse}, as DiT uses them


class IdentityVAE(nn.Module):
    """Pixel space: the 'latent' is the image, deterministic (std 0)."""

    kind = "identity"
    downsample = 1
    has_posterior = False  # encode gives the image itself (std 0): shards store one sample, no posterior
    measure_stats = False

    def __init__(self, scale_factor: float = 1.0):
        super().__init__()
        self.scale_factor = float(scale_factor)

    def latent_channels(self, image_channels: int) -> int:
        return image_channels

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, torch.zeros_like(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale_factor

    def describe(self) -> dict:
        return {"kind": self.kind, "scale_factor": self.scale_factor}


class PretrainedVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` from a hub id (stabilityai/sd-vae-ft-ema) or a local directory
    (what ``save_pretrained`` writes). Frozen, eval mode.

    ``latent_stats``: None (one scale factor, SD's convention), ``"dataset"`` (``prepare`` measures
    each channel's mean and std on the dataset's latents and records them), a ``latents_stats.pt``
    file (LightningDiT's: ``{"mean", "std"}`` of shape (1, C, 1, 1)) or the {"mean", "std"} lists of
    a record."""

    kind = "pretrained"
    has_posterior = True  # encode gives a posterior (mean, std): shards store both, training samples it

    def __init__(
        self,
        path: str,
        scale_factor: float = SD_SCALE_FACTOR,
        subfolder: str | None = None,
        autoencoder=None,
        latent_stats: str | dict | None = None,
    ):
        super().__init__()
        self.vae = autoencoder if autoencoder is not None else _load_autoencoder(path, subfolder)
        self.vae.requires_grad_(False).eval()
        self.path = str(path)
        self.scale_factor = float(scale_factor)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.measure_stats = latent_stats == "dataset"  # prepare measures them (``set_latent_stats``)
        self.latent_mean = self.latent_std = None
        if latent_stats is not None and not self.measure_stats:
            stats = latent_stats if isinstance(latent_stats, dict) else read_latent_stats(latent_stats)
            self.set_latent_stats(stats["mean"], stats["std"])

    def set_latent_stats(self, mean, std) -> None:
        """Per-channel statistics of the raw latents (sequences of C floats); std must be > 0."""
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise ValueError(f"latent statistics mean {mean} / std {std}; expected C means and C stds > 0")
        self.latent_mean, self.latent_std = mean, std
        self.measure_stats = False

    def latent_channels(self, image_channels: int) -> int:
        if image_channels != self.vae.config.in_channels:
            raise ValueError(
                f"the VAE {self.path!r} takes {self.vae.config.in_channels}-channel images, not {image_channels}"
            )
        return self.vae.config.latent_channels

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.latent_mean is None:
            return self.vae.decode(latents / self.scale_factor).sample
        mean, std = channel_tensors(self.latent_mean, self.latent_std, latents)
        return self.vae.decode(latents * std / self.scale_factor + mean).sample  # LightningDiT's order

    def describe(self) -> dict:
        record = {"kind": self.kind, "path": self.path, "scale_factor": self.scale_factor}
        if self.latent_mean is not None:
            record.update(latent_mean=list(self.latent_mean), latent_std=list(self.latent_std))
        return record


def channel_tensors(mean, std, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel lists as (1, C, 1, 1) tensors of ``like``'s dtype and device."""
    shape = (1, len(mean)) + (1,) * (like.dim() - 2)
    as_tensor = lambda v: torch.tensor(v, dtype=like.dtype, device=like.device).view(shape)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


def to_model_space(z: torch.Tensor, record: dict) -> torch.Tensor:
    """Raw latents (N, C, H, W) -> what the model works on, by the codec's record (meta.json's ``vae``):
    ``z * scale_factor``, or ``(z - mean) / std * scale_factor`` per channel when it has statistics."""
    if "latent_mean" not in record:
        return z * record["scale_factor"]
    mean, std = channel_tensors(record["latent_mean"], record["latent_std"], z)
    return (z - mean) / std * record["scale_factor"]


def read_latent_stats(path: str | Path) -> dict:
    """LightningDiT's ``latents_stats.pt`` (``{"mean", "std"}``, each (1, C, 1, 1)) as plain lists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent statistics {str(path)!r} do not exist; expected a latents_stats.pt")
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
        mean, std = stats["mean"].flatten().tolist(), stats["std"].flatten().tolist()
    except Exception as err:  # noqa: BLE001 - one line for any file that is not such a dict
        raise ValueError(
            f"{str(path)!r} is not a latents_stats.pt ({type(err).__name__}); expected {{'mean', 'std'}}"
        ) from None
    return {"mean": mean, "std": std}


def measure_latent_stats(latents: torch.Tensor) -> dict:
    """Per-channel mean and std of raw latent samples (N, C, H, W), as LightningDiT measures them
    (``compute_latent_stats``: over samples and positions, the unbiased std), as plain lists."""
    latents = latents.double()
    return {"mean": latents.mean(dim=(0, 2, 3)).tolist(), "std": latents.std(dim=(0, 2, 3)).tolist()}


def _load_autoencoder(path: str, subfolder: str | None):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder, low_cpu_mem_usage=False)
    except Exception as err:  # noqa: BLE001 - one clear line for every way the load can fail
        raise RuntimeError(
            f"cannot load the VAE {path!r} ({type(err).__name__}); with no network, download it elsewhere "
            "and set vae.codec.path=<local directory with config.json and the weights>"
        ) from err


def small_autoencoder(
    image_channels: int = 1,
    latent_channels: int = 4,
    block_out_channels=(16, 32, 32),
    norm_num_groups: int = 8,
    sample_size: int = 32,
):
    """A small diffusers AutoencoderKL: len(block_out_channels) - 1 halvings (32x32 -> 8x8), no
    mid-block attention (faster on a CPU for the same quality class: design.md, experiments/fmnist_cpu)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        mid_block_add_attention=False,
    )


def codec_from_record(vae: dict, small_vae_dir: str | Path | None = None) -> nn.Module:
    """The codec that wrote a prepared dataset, rebuilt from its record (meta.json's ``vae``: kind,
    scale factor, path) for decoding samples; ``small_vae_dir`` holds the weights of a small VAE."""
    if vae["kind"] == "identity":
        return IdentityVAE(vae["scale_factor"])
    path = small_vae_dir if vae["kind"] == "small_kl" else vae["path"]
    if path is None:
        raise ValueError(f"the {vae['kind']} VAE's weights are not at hand; expected its folder")
    codec = PretrainedVAE(str(path), scale_factor=vae["scale_factor"], latent_stats=record_stats(vae))
    codec.kind = vae["kind"]  # small_kl: what prepare trained, described as such
    return codec


def record_stats(record: dict) -> dict | None:
    """The per-channel statistics a codec record holds (None: one scale factor)."""
    return {"mean": record["latent_mean"], "std": record["latent_std"]} if "latent_mean" in record else None


# ------------------------------------------------------------------------------------------ in a checkpoint
def portable_codec(vae: dict, small_vae_dir: str | Path | None = None) -> dict:
    """What a training checkpoint carries to decode its samples anywhere: the record (meta.json's
    ``vae``: kind, scale factor, hub id or path) and, for the small VAE prepare trained (no hub id to
    fetch it by), its diffusers config and weights. Plain data and tensors (``weights_only`` loads)."""
    carried = {"record": dict(vae)}
    if vae["kind"] == "small_kl":
        autoencoder = _load_autoencoder(str(small_vae_dir), None)
        carried["config_json"] = json.dumps(dict(autoencoder.config))
        carried["state_dict"] = {k: v.detach().clone() for k, v in autoencoder.state_dict().items()}
    return carried


def codec_from_portable(carried: dict) -> nn.Module:
    """The codec ``portable_codec`` described, rebuilt: the small VAE from the weights it carries, a
    pretrained VAE from its hub id or path, the identity from its scale."""
    record = carried["record"]
    if "state_dict" not in carried:
        return codec_from_record(record)
    from diffusers import AutoencoderKL

    autoencoder = AutoencoderKL.from_config(json.loads(carried["config_json"]))
    autoencoder.load_state_dict(carried["state_dict"])
    path, stats = record.get("path", "small_kl"), record_stats(record)
    codec = PretrainedVAE(path, record["scale_factor"], autoencoder=autoencoder, latent_stats=stats)
    codec.kind = record["kind"]
    return codec
