"""Image <-> latent codecs: a pretrained diffusers AutoencoderKL, the identity (pixel space), and a
small KL autoencoder that ``prepare`` trains on the dataset itself when no pretrained VAE fits.

Convention (EDM2-style): shards hold the RAW posterior (mean, std) of ``encode``; the model works on
``scale_factor * z`` with z sampled from that posterior; ``decode`` takes model-space latents.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SD_SCALE_FACTOR = 0.18215  # stabilityai/sd-vae-ft-{ema,mse}, as DiT uses them


class IdentityVAE(nn.Module):
    """Pixel space: the 'latent' is the image, deterministic (std 0)."""

    kind = "identity"
    downsample = 1

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
    (what ``save_pretrained`` writes). Frozen, eval mode."""

    kind = "pretrained"

    def __init__(self, path: str, scale_factor: float = SD_SCALE_FACTOR, subfolder: str | None = None):
        super().__init__()
        from diffusers import AutoencoderKL

        try:
            self.vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, low_cpu_mem_usage=False)
        except Exception as err:  # noqa: BLE001 - one clear line for every way the load can fail
            raise RuntimeError(
                f"cannot load the VAE {path!r} ({type(err).__name__}); with no network, download it elsewhere "
                "and set vae.path=<local directory with config.json and the weights>"
            ) from err
        self.vae.requires_grad_(False).eval()
        self.path = str(path)
        self.scale_factor = float(scale_factor)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

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
        return self.vae.decode(latents / self.scale_factor).sample

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "scale_factor": self.scale_factor}


def small_autoencoder(
    image_channels: int = 1,
    latent_channels: int = 4,
    block_out_channels=(16, 32, 32),
    norm_num_groups: int = 8,
    sample_size: int = 32,
):
    """A small diffusers AutoencoderKL: len(block_out_channels) - 1 halvings (32x32 -> 8x8), no
    mid-block attention (measured ~3x faster on this CPU than with it, for the same quality class)."""
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


class SmallVAERecipe:
    """How ``prepare`` trains the small KL autoencoder on the dataset (L1 + kl_weight * KL, AdamW),
    bounded by ``train_seconds`` and ``max_steps``; ``fit_or_load`` reuses an earlier result."""

    kind = "small_kl"

    def __init__(
        self,
        latent_channels: int = 4,
        block_out_channels=(16, 32, 32),
        norm_num_groups: int = 8,
        train_seconds: float = 150.0,
        max_steps: int = 100_000,
        batch_size: int = 128,
        lr: float = 2e-3,
        kl_weight: float = 1e-4,
        seed: int = 0,
        scale_samples: int = 5000,
    ):
        self.latent_channels = latent_channels
        self.block_out_channels = tuple(block_out_channels)
        self.norm_num_groups = norm_num_groups
        self.train_seconds = train_seconds
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = lr
        self.kl_weight = kl_weight
        self.seed = seed
        self.scale_samples = scale_samples

    def fit_or_load(self, dataset, out_dir: str | Path, device: str | torch.device = "cpu", log=print) -> PretrainedVAE:
        out_dir = Path(out_dir)
        info_file = out_dir / "ditlab_vae.json"
        if not info_file.exists():
            self._fit(dataset, out_dir, torch.device(device), log)
        info = json.loads(info_file.read_text())
        vae = PretrainedVAE(str(out_dir), scale_factor=info["scale_factor"]).to(device)
        vae.kind = self.kind
        return vae

    def _fit(self, dataset, out_dir: Path, device: torch.device, log) -> None:
        first = dataset[0][0]
        model = small_autoencoder(
            first.shape[0], self.latent_channels, self.block_out_channels, self.norm_num_groups, first.shape[-1]
        ).to(device)
        generator = torch.Generator().manual_seed(self.seed)
        # drop_last with a batch no larger than the data, so that every pass yields batches
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=min(self.batch_size, len(dataset)),
            shuffle=True,
            drop_last=True,
            generator=generator,
            num_workers=0,
            collate_fn=_images_only,
        )
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
        start, step, done = time.time(), 0, False
        log(f"training the small VAE for up to {self.train_seconds:.0f} s / {self.max_steps} steps")
        while not done:
            for images in loader:
                images = images.to(device)
                posterior = model.encode(images).latent_dist
                recon = model.decode(posterior.sample(generator=None)).sample
                loss = F.l1_loss(recon, images) + self.kl_weight * posterior.kl().mean() / images[0].numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step % 200 == 0:
                    log(f"  vae step {step}  l1+kl {loss.item():.4f}  {time.time() - start:.0f} s")
                if step >= self.max_steps or time.time() - start >= self.train_seconds:
                    done = True
                    break
        model.eval()
        scale = self._scale_factor(model, dataset, device)
        psnr = reconstruction_psnr(model, dataset, device)
        # Written to a temp dir and renamed, so an interrupted run never leaves a half VAE behind.
        tmp = out_dir.with_name(out_dir.name + f".tmp-{time.time_ns()}")
        model.save_pretrained(tmp, safe_serialization=True)
        info = {"scale_factor": scale, "steps": step, "seconds": round(time.time() - start, 1), "val_psnr_db": psnr}
        (tmp / "ditlab_vae.json").write_text(json.dumps(info, indent=2))
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        log(f"small VAE: {step} steps, scale factor {scale:.4f}, PSNR {psnr:.2f} dB (first 1000 images)")

    @torch.no_grad()
    def _scale_factor(self, model, dataset, device) -> float:
        """1 / std of posterior samples over the first ``scale_samples`` images, as SD chose 0.18215."""
        n = min(self.scale_samples, len(dataset))
        images = torch.stack([dataset[i][0] for i in range(n)])
        zs = []
        generator = torch.Generator(device=device).manual_seed(self.seed)
        for chunk in images.split(500):
            zs.append(model.encode(chunk.to(device)).latent_dist.sample(generator=generator).cpu())
        return float(1.0 / torch.cat(zs).std())


def _images_only(batch):
    return torch.stack([b[0] for b in batch if b[0] is not None])


@torch.no_grad()
def reconstruction_psnr(model_or_codec, dataset, device="cpu", count: int = 1000) -> float:
    """PSNR (dB, images in [0, 1]) of decode(encode(x)) with the posterior mean, over the first ``count``."""
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))]).to(device)
    if isinstance(model_or_codec, (PretrainedVAE, IdentityVAE)):
        codec = model_or_codec
        recon = torch.cat([codec.decode(codec.encode(c)[0] * codec.scale_factor) for c in images.split(250)])
    else:
        recon = torch.cat(
            [model_or_codec.decode(model_or_codec.encode(c).latent_dist.mean).sample for c in images.split(250)]
        )
    mse = F.mse_loss((recon.clamp(-1, 1) + 1) / 2, (images + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def codec_from_meta(meta: dict, prepared_dir: str | Path) -> nn.Module:
    """The codec that wrote a prepared dataset, rebuilt from its meta.json (for decoding samples)."""
    vae = meta["vae"]
    if vae["kind"] == "identity":
        return IdentityVAE(vae["scale_factor"])
    path = Path(prepared_dir) / "vae" if vae["kind"] == "small_kl" else vae["path"]
    return PretrainedVAE(str(path), scale_factor=vae["scale_factor"])
