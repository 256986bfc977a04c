"""An offline feature extractor: a small classifier CNN trained on the dataset itself.

Where no Inception weights are at hand (this machine has no network), FID is measured in the
feature space of this classifier instead. Its numbers are NOT comparable to Inception FID, so they
are always logged under their own name (``fid_clf``). The classifier also says whether a sample
conditioned on class k looks like class k (``sample_accuracy``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

EXTRACTOR_NAME = "ditlab-clf"


class SmallClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4) -> 128-d features -> logits. Input in [-1, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)

        def stage(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(stage(in_channels, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.features = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(self.body(x))  # (N, feature_dim)
        return f, self.head(f)  # features, logits


def save_classifier(model: SmallClassifier, path: Path, info: dict) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".model.safetensors.tmp-{os.getpid()}"
    save_file(model.state_dict(), str(tmp))
    tmp.replace(path / "model.safetensors")
    (path / "classifier.json").write_text(json.dumps({"config": model.config, **info}, indent=2))


def load_classifier(path: str | Path, device="cpu") -> SmallClassifier:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "classifier.json").is_file():
        raise FileNotFoundError(f"no classifier at {str(path)!r}; it is trained by 'python -m ditlab.prepare'")
    config = json.loads((path / "classifier.json").read_text())["config"]
    model = SmallClassifier(**config)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"))
    return model.to(device).eval()


def train_classifier(
    train_set,
    val_set,
    num_classes: int,
    out_dir: str | Path,
    seconds: float = 120.0,
    max_steps: int = 1_000_000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    log=print,
    device="cpu",
) -> dict:
    """Train on (image in [-1, 1], label, key) items with flips; report val accuracy; save."""
    torch.manual_seed(seed)
    channels = train_set[0][0].shape[0]
    model = SmallClassifier(channels, num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # drop_last with a batch no larger than the data, so that every pass yields batches
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=min(batch_size, len(train_set)),
        shuffle=True,
        drop_last=True,
        collate_fn=_images_labels,
        generator=torch.Generator().manual_seed(seed),
    )
    start, step, done = time.time(), 0, False
    while not done:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            flip = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x)[1], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= max_steps or time.time() - start > seconds:
                done = True
                break
    model.eval()
    correct = total = 0
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=500, collate_fn=_images_labels)
    with torch.no_grad():
        for x, y in val_loader:
            correct += (model(x.to(device))[1].argmax(1).cpu() == y).sum().item()
            total += len(y)
    info = {"val_accuracy": correct / total, "steps": step, "seconds": round(time.time() - start, 1)}
    save_classifier(model.cpu(), Path(out_dir), info)
    log(f"classifier: {step} steps, val accuracy {info['val_accuracy']:.4f}")
    return info


def _images_labels(batch):
    good = [b for b in batch if b[0] is not None]
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good])


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity adapter: uint8 (N, C, H, W) -> ('features', 'logits_unbiased')."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"the {EXTRACTOR_NAME} extractor needs feature_extractor_weights_path=<classifier dir>")
        self.model = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor):
        x = x.float() / 127.5 - 1.0
        features, logits = self.model(x)
        out = {"features": features, "logits_unbiased": logits}
        return tuple(out[name] for name in self.features_list)


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR_NAME, ClassifierFeatureExtractor)
