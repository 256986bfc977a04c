"""Image sources for ``ditlab.prepare``: each a torch Dataset of (image in [-1, 1] CHW, label, key)
with ``classes``; an unreadable image yields ``None`` instead of a tensor so that extraction can
count and skip it without stopping."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ditlab.data.transforms import center_crop_arr, uint8_to_model_range

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jpe", ".ppm")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzipped or not."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as f:
                data = f.read()
            ndim = data[3]
            shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    raise FileNotFoundError(path)


class FashionMNIST(Dataset):
    """Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``
    (/usr/share/datasets/fashion-mnist) or a torchvision root (``<root>/FashionMNIST/raw``).
    28x28 images are zero-padded to ``image_size`` (32 by default) so that 8x downsampling fits."""

    name = "fashion_mnist"

    def __init__(self, root: str = "/usr/share/datasets/fashion-mnist", split: str = "train", image_size: int = 32):
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(FASHION_MNIST_FILES)}")
        images_name, labels_name = FASHION_MNIST_FILES[split]
        roots = [Path(root), Path(root) / "FashionMNIST" / "raw"]
        for r in roots:
            try:
                self.images = _read_idx(r / images_name)
                self.labels = _read_idx(r / labels_name).astype(np.int64)
                break
            except FileNotFoundError:
                continue
        else:
            raise FileNotFoundError(
                f"Fashion-MNIST not found under {root!r} (looked for {images_name}[.gz]); install it with "
                "'apt-get install dataset-fashion-mnist' or set data.source.root=<dir with the IDX files>"
            )
        if image_size < 28:
            raise ValueError(f"image_size={image_size} is smaller than Fashion-MNIST's 28 pixels")
        self.pad = (image_size - 28) // 2, image_size - 28 - (image_size - 28) // 2
        self.classes = list(FASHION_MNIST_CLASSES)
        self.channels = 1
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def uint8_image(self, i: int) -> np.ndarray:
        return np.pad(self.images[i], (self.pad, self.pad))  # (H, W) uint8, black border

    def __getitem__(self, i: int):
        return uint8_to_model_range(self.uint8_image(i)), int(self.labels[i]), f"{i}"


class ImageFolder(Dataset):
    """A class-per-sub-folder tree (ImageNet's train layout), ADM preprocessing at ``image_size``.

    ``val_fraction`` of each class (every k-th file in sorted order, deterministic) forms the
    validation split, since such trees rarely ship one.
    """

    name = "folder"

    def __init__(
        self, root: str, split: str = "train", image_size: int = 256, val_fraction: float = 0.0, channels: int = 3
    ):
        path = Path(root)
        if not path.is_dir():
            raise FileNotFoundError(f"image folder {root!r} does not exist; expected <root>/<class>/<image files>")
        self.classes = sorted(d.name for d in path.iterdir() if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"image folder {root!r} has no class sub-folders; expected <root>/<class>/<images>")
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'val'")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        every = round(1 / val_fraction) if val_fraction > 0 else 0
        self.samples: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            files = sorted(f for f in (path / cls).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            for j, f in enumerate(files):
                is_val = every > 0 and j % every == every - 1
                if is_val == (split == "val"):
                    self.samples.append((f, label))
        self.image_size = image_size
        self.channels = channels
        self.root = path

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        file, label = self.samples[i]
        key = str(file.relative_to(self.root))
        try:
            with Image.open(file) as img:
                img = img.convert("RGB" if self.channels == 3 else "L")
                arr = center_crop_arr(img, self.image_size)
        except Exception:  # noqa: BLE001 - any unreadable file is skipped and reported, not fatal
            return None, label, key
        return uint8_to_model_range(arr), label, key


def collate_skipping_failures(batch):
    """Batch the readable images; keys of unreadable ones come back separately."""
    good = [b for b in batch if b[0] is not None]
    failed = [b[2] for b in batch if b[0] is None]
    if not good:
        return None, None, [], failed
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, [b[2] for b in good], failed
