"""What the uncertainty adds to a measurement: seconds of ``compute_metrics`` with and without
``fid_protocol.uncertainty`` on random features of the shapes ditlab measures (no network involved:
the features are what the extractor would hand over).

    python experiments/uncertainty/cost.py     # the timing table in README.md
"""

import time

import numpy as np
import torch

from ditlab.metrics.fidelity import compute_metrics
from ditlab.metrics.reference import ReferenceStats
from ditlab.metrics.uncertainty import Uncertainty

CASES = [  # (what, feature dim, samples, reference features kept, metrics)
    ("fid_clf as make train measures it", 128, 500, 10000, ("fid", "kid", "prc")),
    ("fid_clf, 5000 samples", 128, 5000, 10000, ("fid", "kid", "prc")),
    ("Inception FID-1K in training", 2048, 1000, 10000, ("fid",)),
    ("Inception FID-10K", 2048, 10000, 10000, ("fid",)),
]


def seconds(*args) -> float:
    start = time.perf_counter()
    compute_metrics(*args)
    return time.perf_counter() - start


def main():
    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}\n")
    print("| case | D | N | metrics | without (s) | with 100 resamples (s) | added (s) |")
    print("|---|---|---|---|---|---|---|")
    for what, dim, count, kept, metrics in CASES:
        mixing = np.eye(dim) + 0.1 * rng.standard_normal((dim, dim))
        reference = torch.from_numpy(rng.standard_normal((kept, dim)) @ mixing)
        stats = ReferenceStats.from_features(reference, "clf", keep=kept)
        features = torch.from_numpy(0.1 + rng.standard_normal((count, dim)) @ mixing)
        generated = {"features": features, "logits": torch.from_numpy(rng.standard_normal((count, 10)))}
        labels = torch.from_numpy(rng.integers(0, 10, count))
        plain = seconds(generated, stats, metrics, 1000, labels)
        full = seconds(generated, stats, metrics, 1000, labels, Uncertainty())
        print(f"| {what} | {dim} | {count} | {', '.join(metrics)} | {plain:.1f} | {full:.1f} | {full - plain:.1f} |")


if __name__ == "__main__":
    main()
