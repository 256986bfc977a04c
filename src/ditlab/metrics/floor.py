"""The floor of a FID-type number: held-out real images scored against the same reference statistics,
at the same sample count and class draw as the generated samples.

FID is biased upwards at finite N, so a perfect generator scores above zero; that floor depends on N
(and on the class draw: random class proportions add their own spread). A generated FID means little
without it beside it: the distance of the generator from the data is its FID minus the floor at that
N, give or take both spreads. ``prepare`` stores the held-out images' features beside the reference
statistics (``ReferenceStats.floor_features``); the floor at any N is then a matter of drawing subsets.
"""

from __future__ import annotations

import numpy as np
import torch

from ditlab.metrics.frechet import frechet_distances_to_reference
from ditlab.metrics.reference import ReferenceStats

FLOOR_DRAWS = 10  # subsets of held-out images per floor: its mean and its spread


def floor_subsets(labels: np.ndarray, n: int, class_draw: str, draws: int, seed: int) -> list[np.ndarray]:
    """``draws`` index sets of ``n`` held-out images each: uniform (random images) or balanced (every
    class n // K or n // K + 1 times, as ``sample_labels`` draws the generated classes); without
    repetition where the held-out set is large enough, with it otherwise."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    subsets = []
    for _ in range(draws):
        if class_draw == "uniform":
            subsets.append(rng.choice(len(labels), size=n, replace=n > len(labels)))
            continue
        counts = np.full(len(classes), n // len(classes))
        counts[rng.permutation(len(classes))[: n % len(classes)]] += 1
        picks = []
        for cls, count in zip(classes, counts):
            members = np.flatnonzero(labels == cls)
            picks.append(rng.choice(members, size=count, replace=count > len(members)))
        subsets.append(np.concatenate(picks))
    return subsets


def fid_floor(reference: ReferenceStats, n: int, class_draw: str, draws: int = FLOOR_DRAWS, seed: int = 0) -> dict:
    """{"mean", "sd", "draws", "num_samples"}: the FID of ``draws`` sets of ``n`` held-out real images
    against ``reference``'s statistics; an empty dict when the reference stores no held-out features."""
    if reference.floor_features is None or len(reference.floor_features) < 2:
        return {}
    features = torch.as_tensor(np.asarray(reference.floor_features, dtype=np.float64))  # (held-out, D)
    subsets = floor_subsets(np.asarray(reference.floor_labels), n, class_draw, draws, seed)
    counts = torch.stack([torch.bincount(torch.as_tensor(s), minlength=len(features)) for s in subsets])
    # counts: (draws, held-out), how often each held-out image is in each draw
    # every draw against the reference's square root, taken once (at N < D through the N x N Gram
    # matrix): one D x D root instead of one per draw
    values = frechet_distances_to_reference(features, counts, reference.mu, reference.sigma).tolist()
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "draws": draws, "num_samples": n}
