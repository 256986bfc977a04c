"""How the fixed-timestep validation loss compares with fid_clf as an instrument (issue 28, item 3):
over the runs that ``ditlab report`` reads (configs x seeds), for each metric

- the seed-to-seed spread inside a config (the pooled sd across seeds) against the spread of the
  configs' means: their ratio says how many seed-sds apart the configs lie, i.e. how well the metric
  separates them with the seeds at hand;
- how the configs rank by each metric, and the rank correlation of the two (Spearman) over the
  configs' means and over the single runs.

    python experiments/recipes/fixed_loss.py /work/runs/multirun/seeds [--metrics val/fid_clf,val/loss_fixed]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import stats

from ditlab.report import find_runs, label_configs


def pooled_sd(groups: list[list[float]]) -> float:
    """The seed-to-seed sd inside a config, pooled over configs (each weighted by its n - 1)."""
    squares = sum(sum((v - np.mean(g)) ** 2 for v in g) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(squares / dof) if dof else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--metrics", default="val/fid_clf,val/loss_fixed")
    args = p.parse_args()
    names = args.metrics.split(",")
    runs = [r for r in find_runs(args.dirs) if all(n in r.metrics for n in names)]
    label_configs(runs)
    configs = sorted({r.label for r in runs})
    values = {n: {c: [r.metrics[n] for r in runs if r.label == c] for c in configs} for n in names}
    print(f"{len(runs)} runs, {len(configs)} configs\n")
    print("| metric | seed sd (pooled) | sd of the config means | ratio | configs, best first |")
    print("|---|---:|---:|---:|---|")
    for n in names:
        means = {c: float(np.mean(v)) for c, v in values[n].items()}
        within, between = pooled_sd(list(values[n].values())), float(np.std(list(means.values()), ddof=1))
        order = ", ".join(f"{c} {means[c]:.4g}" for c in sorted(configs, key=means.get))
        print(f"| {n} | {within:.4g} | {between:.4g} | {between / within:.2f} | {order} |")
    a, b = names[:2]
    over_means = stats.spearmanr([np.mean(values[a][c]) for c in configs], [np.mean(values[b][c]) for c in configs])
    over_runs = stats.spearmanr([r.metrics[a] for r in runs], [r.metrics[b] for r in runs])
    print(
        f"\nSpearman {a} vs {b}: config means {over_means.statistic:.2f} (p {over_means.pvalue:.2g}, "
        f"n {len(configs)}); runs {over_runs.statistic:.2f} (p {over_runs.pvalue:.2g}, n {len(runs)})"
    )


if __name__ == "__main__":
    main()
