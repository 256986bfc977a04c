"""Statistics of a metric over the runs of one config that differ only in their seed, and the
difference between two configs with its interval: what ``ditlab report`` tabulates.

Two sources of spread meet here. A run's own interval (``fid_clf_se``, from its samples:
``ditlab.metrics.uncertainty``) measures the sampling noise of its number; the standard deviation
across seeds measures that noise plus the training's own seed-to-seed variation. A difference between
two configs is judged against the second when each config has at least two seeds (Welch's t
interval), else against the runs' own se alone (a normal interval that knows nothing of the
training's variation, and says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Spread:
    """A metric over the n runs (seeds) of one config; ``within_se``: the root mean square of the
    runs' own se (None where the runs report none); ``runs``: each run's (value, ci_low, ci_high)."""

    n: int
    mean: float
    sd: float  # nan for n = 1
    within_se: float | None
    runs: tuple[tuple[float, float | None, float | None], ...]


@dataclass(frozen=True)
class Difference:
    """``b - a`` of a metric's means, its interval, and how the interval was made."""

    estimate: float
    low: float
    high: float
    method: str

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0: the two configs differ at this level."""
        return self.low > 0 or self.high < 0


def spread(values: list[float], ses: list[float | None], lows: list[float | None], highs: list[float | None]):
    """The ``Spread`` of one config's runs: their values, and each one's se and interval (None: none)."""
    finite = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not finite:
        return None
    kept = np.array([values[i] for i in finite], dtype=np.float64)
    own = [ses[i] for i in finite if ses[i] is not None]
    within = math.sqrt(float(np.mean(np.square(own)))) if own and len(own) == len(finite) else None
    return Spread(
        n=len(kept),
        mean=float(kept.mean()),
        sd=float(kept.std(ddof=1)) if len(kept) > 1 else math.nan,
        within_se=within,
        runs=tuple((values[i], lows[i], highs[i]) for i in finite),
    )


def difference(a: Spread, b: Spread, level: float = 0.95) -> Difference | None:
    """``b.mean - a.mean`` with a ``level`` interval: Welch's t across seeds when both have two or more
    runs; else normal from the runs' own se (sampling noise only); None when neither is known."""
    estimate = b.mean - a.mean
    if a.n >= 2 and b.n >= 2:
        va, vb = a.sd**2 / a.n, b.sd**2 / b.n
        se = math.sqrt(va + vb)
        if se == 0:
            return Difference(estimate, estimate, estimate, f"Welch, {a.n}+{b.n} seeds")
        dof = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
        half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
        return Difference(estimate, estimate - half, estimate + half, f"Welch, {a.n}+{b.n} seeds, {dof:.1f} dof")
    if a.within_se is not None and b.within_se is not None:
        se = math.sqrt(a.within_se**2 / a.n + b.within_se**2 / b.n)
        half = float(stats.norm.ppf(0.5 + level / 2)) * se
        method = "the runs' own se only: seed-to-seed variation unmeasured (one seed)"
        return Difference(estimate, estimate - half, estimate + half, method)
    return None
