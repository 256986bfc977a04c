"""Reconstruction quality of an autoencoder: PSNR of decode(encode(x))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditlab.models.vae import IdentityVAE, PretrainedVAE


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
