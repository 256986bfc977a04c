"""Coverage of the FID interval ditlab reports, on Gaussian features whose Fréchet distance to the
reference is known, at several sample counts N and feature dimensions D.

For each (D, N): `draws` independent sample sets from the generator N(mu_g, S_g), each measured
against the exact reference N(0, S_r) the way ditlab measures (``fid_bootstrap`` with
``resamples`` resamples, ``bias_corrected_interval``, ``fid_inf``). Printed per row: the true
distance, the mean and sd of FID_N over the draws, the mean se the bootstrap reports, the coverage
of the reported (bias-corrected) 95% interval and of the uncorrected percentile interval, and the
mean and RMSE of FID_inf against those of FID_N.

    python experiments/uncertainty/coverage.py            # the table in README.md
"""

import argparse
import time

import numpy as np
import torch

from ditlab.metrics.definitions import Gaussian
from ditlab.metrics.frechet import frechet_distance
from ditlab.metrics.uncertainty import (
    Uncertainty,
    bias_corrected_interval,
    bootstrap_indices,
    counts_of,
    fid_bootstrap,
    fid_inf,
)


def gaussians(dim, seed=0):
    """The unit tests' pair (tests/unit/test_uncertainty.py): a reference N(0, S_r), a generator N(mu_g, S_g)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    sigma_r = (q * np.linspace(0.5, 2, dim)) @ q.T
    mixing = 1.2 * np.eye(dim) + 0.2 * rng.standard_normal((dim, dim)) / np.sqrt(dim)
    sigma_g = mixing @ sigma_r @ mixing.T
    mu_g = rng.standard_normal(dim) / np.sqrt(dim)
    reference = Gaussian(np.zeros(dim), sigma_r)
    return reference, mu_g, np.linalg.cholesky(sigma_g), frechet_distance(mu_g, sigma_g, reference.mu, sigma_r)


def row(dim, count, draws, resamples):
    reference, mu, root, true = gaussians(dim)
    settings = Uncertainty(resamples=resamples)
    rng = np.random.default_rng(1)
    raw, ses, covered, percentile, extrapolated = [], [], [], [], []
    for i in range(draws):
        x = mu + rng.standard_normal((count, dim)) @ root.T
        replicates = fid_bootstrap(x, reference, counts_of(bootstrap_indices(count, resamples, i), count))
        fid = Gaussian.of(x).distance(reference)
        interval = bias_corrected_interval("fid", fid, replicates, settings.z)
        low, high = np.quantile(replicates.numpy(), [0.025, 0.975])
        raw.append(fid)
        ses.append(interval.se)
        covered.append(interval.low <= true <= interval.high)
        percentile.append(low <= true <= high)
        extrapolated.append(fid_inf(x, reference, seed=i))
    raw, extrapolated = np.array(raw), np.array(extrapolated)
    rmse = lambda v: float(np.sqrt(np.mean((v - true) ** 2)))  # noqa: E731
    return (
        f"| {dim} | {count} | {count / dim:.0f} | {true:.3f} | {raw.mean():.3f} | {raw.std():.3f} | {np.mean(ses):.3f} "
        f"| {np.mean(covered):.3f} | {np.mean(percentile):.3f} | {extrapolated.mean():.3f} | {rmse(extrapolated):.3f} "
        f"| {rmse(raw):.3f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"draws {args.draws}, resamples {args.resamples}; binomial sd of a 95% coverage: "
        f"{np.sqrt(0.95 * 0.05 / args.draws):.3f}\n"
    )
    print(
        "| D | N | N/D | true FID | mean FID_N | sd FID_N | mean se | coverage (reported) | coverage (percentile) "
        "| mean FID_inf | RMSE FID_inf | RMSE FID_N |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    start = time.time()
    for dim, count in [(8, 200), (8, 1000), (16, 100), (16, 400), (32, 200), (32, 1000), (64, 500), (128, 500)]:
        draws = args.draws if dim * count <= 16000 else max(50, args.draws // 4)
        print(row(dim, count, draws, args.resamples), flush=True)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
