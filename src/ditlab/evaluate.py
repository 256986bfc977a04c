"""``python -m ditlab.evaluate samples=... reference=...``: FID / IS / KID / precision-recall table + JSON.

``python -m ditlab.evaluate run=<run dir>``: the run's FID curve, every checkpoint scored with the
run's own FID protocol (``ditlab.metrics.curve``) into ``fid_curve.csv`` and ``fid_curve.png``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ditlab.cli import exit_on_error, hydra_command

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
        from PIL import Image

        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images in {str(path)!r}")
        arrays = [np.array(Image.open(f)) for f in files]
        arr = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), None
    raise FileNotFoundError(f"samples={str(path)!r} is neither an .npz file nor a folder of images")


def resolve_reference(reference: str, extractor: str, weights_path: str | None):
    """A stats .npz, or a prepared dir (its reference_<extractor>.npz and, for clf, its classifier)."""
    ref = Path(reference)
    if ref.is_dir():
        if extractor == "clf" and weights_path is None:
            weights_path = str(ref / "classifier")
        ref = ref / f"reference_{extractor}.npz"
    return ref, weights_path


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from ditlab.metrics.fidelity import Extractor, compute_metrics
    from ditlab.metrics.reference import ReferenceStats

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.get("run"):
        return evaluate_run(cfg, device)
    if cfg.samples is None or cfg.reference is None:
        raise ValueError("nothing to evaluate; expected samples=<.npz or folder> reference=<stats>, or run=<run dir>")
    extractor = cfg.extractor or "inception"
    images, labels = load_samples(cfg.samples)
    ref_path, weights = resolve_reference(cfg.reference, extractor, cfg.weights_path)
    reference = ReferenceStats.load(ref_path, extractor)
    size = tuple(images.shape[-2:])
    if reference.image_size is not None and size != (reference.image_size, reference.image_size):
        raise ValueError(
            f"samples={cfg.samples} are {size[0]}x{size[1]} images but {ref_path} was computed on "
            f"{reference.image_size}x{reference.image_size} images; expected samples of the reference's size"
        )
    features = Extractor(extractor, weights, device=device, progress=cfg.progress)(images)
    results = compute_metrics(
        features, reference, tuple(cfg.metrics), cfg.kid_subset_size, labels=labels if extractor == "clf" else None
    )
    results["num_samples"] = len(images)
    out = Path(cfg.out) if cfg.out else Path(str(cfg.samples).rstrip("/") + ".metrics.json")
    out.write_text(
        json.dumps(
            {"samples": str(cfg.samples), "reference": str(ref_path), "extractor": extractor, "metrics": results},
            indent=2,
        )
    )
    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(f"(written to {out})")
    return results


def evaluate_run(cfg: DictConfig, device: str) -> dict:
    from ditlab.metrics.curve import read_curve, score_run

    csv_path, scored = score_run(cfg.run, cfg.ema, cfg.num_samples, cfg.extractor, device, cfg.progress)
    rows = read_curve(csv_path)
    print(f"{scored} checkpoint(s) scored now, {len(rows) - scored} reused; curve in {csv_path} and .png")
    return {"scored": scored, "rows": rows}


@hydra_command("ditlab.evaluate", "evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.evaluate", evaluate, cfg)


if __name__ == "__main__":
    main()
