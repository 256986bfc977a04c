"""``python -m ditlab.evaluate samples=... reference=...``: FID / IS / KID / precision-recall table + JSON.

``python -m ditlab.evaluate run_dir=<run dir>``: the run's FID curve, every checkpoint scored with the
run's own FID protocol (``ditlab.metrics.curve``) into ``fid_curve.csv`` and ``fid_curve.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from ditlab.data.prepared import reference_source
from ditlab.metrics.curve import read_curve, score_checkpoints
from ditlab.metrics.protocol import FIDProtocol
from ditlab.runtime.errors import exit_on_error, hydra_command
from ditlab.runtime.files import write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (N, C, H, W) images (and labels when stored) from an ADM .npz or a folder of images."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ValueError(f"{str(path)!r} has no 'arr_0'; expected ADM's format (uint8 N x H x W x C)")
            arr = data["arr_0"]
            labels = torch.from_numpy(data["labels"]) if "labels" in data else None
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise ValueError(f"{str(path)!r}: arr_0 is {arr.dtype} {arr.shape}; expected uint8 (N, H, W, C)")
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), labels
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images in {str(path)!r}")
        arrays = [np.array(Image.open(f)) for f in files]
        arr = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), None
    raise FileNotFoundError(f"samples={str(path)!r} is neither an .npz file nor a folder of images")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.get("run_dir"):
        return evaluate_run(cfg, device)
    if cfg.samples is None or cfg.reference is None:
        raise ValueError(
            "nothing to evaluate; expected samples=<.npz or folder> reference=<stats>, or run_dir=<run dir>"
        )
    images, labels = load_samples(cfg.samples)
    prepared, reference_file = reference_source(cfg.reference)  # local or s3://
    protocol = FIDProtocol(
        extractor=cfg.extractor or "inception",
        num_samples=len(images),
        reference=reference_file,  # None for a prepared dir: its own statistics
        weights_path=cfg.weights_path,
        metrics=tuple(cfg.metrics),
        kid_subset_size=cfg.kid_subset_size,
    )
    stats = protocol.load_reference(prepared)
    size = tuple(images.shape[-2:])
    if stats.image_size is not None and size != (stats.image_size, stats.image_size):
        raise ValueError(
            f"samples={cfg.samples} are {size[0]}x{size[1]} images but {protocol.reference_path(prepared)} was "
            f"computed on {stats.image_size}x{stats.image_size} images; expected samples of the reference's size"
        )
    extractor = protocol.make_extractor(prepared, device)
    extractor.progress = cfg.progress
    results = protocol.measure(extractor(images), stats, labels)
    results["num_samples"] = len(images)
    out = Path(cfg.out) if cfg.out else Path(str(cfg.samples).rstrip("/") + ".metrics.json")
    record = {
        "samples": str(cfg.samples),
        "reference": str(protocol.reference_path(prepared)),
        "extractor": protocol.extractor,
        "metrics": results,
    }
    write_json(out, record)
    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(f"(written to {out})")
    return results


def evaluate_run(cfg: DictConfig, device: str) -> dict:
    csv_path, scored = score_checkpoints(cfg.run_dir, cfg.ema, cfg.num_samples, cfg.extractor, device, cfg.progress)
    rows = read_curve(csv_path)
    print(f"{scored} checkpoint(s) scored now, {len(rows) - scored} reused; curve in {csv_path} and .png")
    return {"scored": scored, "rows": rows}


@hydra_command("ditlab.evaluate", "evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.evaluate", evaluate, cfg)


if __name__ == "__main__":
    main()
