"""A small classifier CNN of the dataset's images: the offline feature space of ``fid_clf``.

Where no Inception weights are at hand (this machine has no network), FID is measured in the
feature space of this classifier instead (``ditlab.metrics.classifier_features``); it is trained by
``ditlab.pipelines.fit_classifier``. Stored as safetensors + a JSON config, never pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ditlab.runtime.files import atomic_path


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
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        (tmp / "classifier.json").write_text(json.dumps({"config": model.config, **info}, indent=2))


def load_classifier(path: str | Path, device="cpu") -> SmallClassifier:
    path = Path(path)
    if not (path / "classifier.json").is_file():
        raise FileNotFoundError(f"no classifier at {str(path)!r}; it is trained by 'python -m ditlab.prepare'")
    config = json.loads((path / "classifier.json").read_text())["config"]
    model = SmallClassifier(**config)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"))
    return model.to(device).eval()
