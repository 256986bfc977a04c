"""Frozen image encoders for representation alignment (REPA): each maps uint8 images (N, C, H, W) to a
grid of patch features (N, D, h, w) that the DiT's tokens are aligned with.

- ``ClassifierEncoder``: the dataset classifier ``prepare`` trains for fid_clf (offline; its last
  conv stage: a 4x4 grid of 4 * width channels for 32x32 images).
- ``TimmEncoder``: any timm vision transformer by name, with hub or local weights (REPA's
  DINOv2 ViT-B/14: ``vit_base_patch14_dinov2.lvd142m`` at 224 pixels, a 16x16 grid of 768).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ditlab.models.classifier import load_classifier


class ClassifierEncoder(nn.Module):
    """The dataset classifier's last feature map, from images in its own [-1, 1] range."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.classifier = load_classifier(path).requires_grad_(False).eval()
        self.feature_dim = 4 * self.classifier.config["width"]  # the channels of its last stage

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0  # uint8 (N, C, H, W) -> [-1, 1]
        return self.classifier.body(x)  # (N, D, h, w)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: its batch norms keep their statistics


class TimmEncoder(nn.Module):
    """A timm vision transformer's patch tokens as a grid. ``weights_path``: a local weights file
    (machines without network); else ``pretrained`` downloads the hub weights; neither: random
    weights (tests). Images are resized to ``image_size`` and normalised as the model was trained."""

    def __init__(self, name: str, image_size: int = 224, pretrained: bool = True, weights_path: str | None = None):
        super().__init__()
        overlay = {"file": str(weights_path)} if weights_path else None
        self.model = timm.create_model(
            name,
            pretrained=pretrained or weights_path is not None,
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            img_size=image_size,
        )
        self.model.requires_grad_(False).eval()
        config = timm.data.resolve_data_config({}, model=self.model)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, -1, 1, 1), persistent=False)
        self.image_size = image_size
        self.grid = image_size // self.model.patch_embed.patch_size[0]
        self.feature_dim = self.model.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0  # uint8 (N, C, H, W) -> [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey images as RGB
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        tokens = self.model.forward_features((x - self.mean) / self.std)  # (N, prefix + g * g, D)
        tokens = tokens[:, self.model.num_prefix_tokens :]  # the patch tokens (N, g * g, D)
        return tokens.transpose(1, 2).unflatten(2, (self.grid, self.grid))  # (N, D, g, g)

    def train(self, mode: bool = True):
        return super().train(False)
