"""Image preprocessing as ADM / DiT do it, so latents match the official pipeline."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side is >= 2x the target (cheap and
    alias-free), resize the short side to ``image_size`` with BICUBIC, then crop the centre.
    Returns uint8 HWC."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def uint8_to_model_range(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 HWC (or HW) -> float32 CHW in [-1, 1]."""
    x = torch.as_tensor(np.asarray(arr))
    if x.dim() == 2:
        x = x.unsqueeze(-1)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)


def model_range_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), the layout of ADM's .npz files."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
