"""The data path's pure parts: ADM's crop, the per-batch latent draw, a missing dataset's message."""

import numpy as np
import pytest
import torch

from ditlab.data.datamodule import latents_from_block
from ditlab.data.sources import FashionMNIST
from ditlab.data.transforms import center_crop_arr


def test_missing_fashion_mnist_names_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(root=str(tmp_path))


def test_center_crop_arr_matches_adm():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 900, 3), dtype=np.uint8))
    out = center_crop_arr(img, 256)
    assert out.shape == (256, 256, 3)
    # ADM: BOX-halve 900x600 -> 450x300 (300 < 512 stops), BICUBIC to 384x256, centre crop
    half = img.resize((450, 300), resample=Image.BOX).resize((384, 256), resample=Image.BICUBIC)
    assert np.array_equal(out, np.array(half)[:, 64:320])


def test_latents_from_block_flip_posterior_scale():
    mean = torch.randn(4, 3, 2, 2)
    block = torch.stack(
        [torch.stack([mean, torch.zeros_like(mean)], 1), torch.stack([mean.flip(-1), torch.zeros_like(mean)], 1)], 1
    )  # (4, 2, 2, 3, 2, 2)
    z = latents_from_block(block, 0.5, torch.Generator().manual_seed(0))
    for i in range(4):  # std 0: each row is the image or its flip, scaled
        assert torch.equal(z[i], 0.5 * mean[i]) or torch.equal(z[i], 0.5 * mean[i].flip(-1))
    block[:, :, 1] = 1.0  # std 1: samples differ from the mean
    z2 = latents_from_block(block, 1.0, torch.Generator().manual_seed(0), flip=False)
    assert (z2 - mean).abs().mean() > 0.3
