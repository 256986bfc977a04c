"""torch-fidelity adapter for the dataset classifier: features for FID/KID/PR, logits for IS and
sample accuracy. Its metrics are NOT comparable to Inception's and always carry their own name
(``fid_clf``)."""

from __future__ import annotations

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ditlab.models.classifier import load_classifier

EXTRACTOR_NAME = "ditlab-clf"


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
