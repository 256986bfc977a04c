"""The table of experiments/recipes/README.md from the trials' logs: fid_clf and sample accuracy at
each FID step, the median step time (from train/img_per_s over 20-step windows, batch 32) and the
run's wall time. Usage: python experiments/recipes/summarize.py [ROOT] (default /work/runs)."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

BATCH = 32


def summarize(run: Path) -> dict:
    rows = list(csv.DictReader((run / "csv" / "run" / "metrics.csv").open()))
    fid = {int(r["step"]): float(r["val/fid_clf"]) for r in rows if r.get("val/fid_clf")}
    acc = {int(r["step"]): float(r["val/sample_accuracy_clf"]) for r in rows if r.get("val/sample_accuracy_clf")}
    rates = [float(r["train/img_per_s"]) for r in rows if r.get("train/img_per_s")]
    summary = json.loads((run / "metrics.json").read_text())
    return {
        "fid": fid,
        "acc": acc,
        "ms_per_step": 1000 * BATCH / statistics.median(rates) if rates else float("nan"),
        "fit_seconds": summary.get("fit_seconds"),
    }


def main(root: Path) -> None:
    runs = sorted((root / "outputs" / "train").glob("recipes_*"))
    print("| trial | seed | fid_clf @500 | @1000 | @1500 | @2000 | accuracy @2000 | ms/step | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        if not (run / "metrics.json").is_file():
            continue
        s = summarize(run)
        name, seed = run.name.removeprefix("recipes_").rsplit("_s", 1)
        cells = [f"{s['fid'].get(k, float('nan')):.2f}" for k in (500, 1000, 1500, 2000)]
        print(
            f"| {name} | {seed} | " + " | ".join(cells) + f" | {s['acc'].get(2000, float('nan')):.3f} | "
            f"{s['ms_per_step']:.1f} | {s['fit_seconds']} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/runs"))
