"""A run's FID curve: every checkpoint of a training run scored the way its FID callback scored
(same sampler, guidance, sample count, seed, extractor and reference), written to
``<run>/fid_curve.csv`` (step, images seen, metrics) and ``<run>/fid_curve.png``.

Sampling goes through ``ditlab.inference.load_model(...).generate``, the one generation path.
A rerun scores only the checkpoints not in the CSV yet (keyed by step and weights), so the curve
of a run that is still training can be brought up to date cheaply.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger("ditlab.evaluate")

CSV_NAME, PNG_NAME = "fid_curve.csv", "fid_curve.png"
KEY_COLUMNS = ["step", "images_seen", "weights", "checkpoint"]


def run_checkpoints(run_dir: Path) -> list[tuple[int, int | None, Path]]:
    """(step, images seen, path) of each distinct checkpoint of a run, by step; a ``last.ckpt`` that
    repeats a periodic checkpoint's step is left out."""
    paths = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    if not paths:
        raise FileNotFoundError(f"run={str(run_dir)!r} has no checkpoints/*.ckpt; expected a ditlab training run dir")
    found: dict[int, tuple[int, int | None, Path]] = {}
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no full read
        step = int(ckpt["global_step"])
        seen = ckpt.get("callbacks", {}).get("Throughput", {}).get("images_seen")
        if step not in found or found[step][2].name == "last.ckpt":
            found[step] = (step, None if seen is None else int(seen), path)
    return [found[s] for s in sorted(found)]


def read_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_curve(rows: list[dict], path: Path) -> None:
    metric_columns = sorted({k for row in rows for k in row} - set(KEY_COLUMNS))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=KEY_COLUMNS + metric_columns, restval="")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["weights"], int(r["step"]))))
    tmp.replace(path)


def plot_curve(rows: list[dict], path: Path) -> None:
    """One panel per metric against images seen (steps where a checkpoint does not record them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({k for row in rows for k in row} - set(KEY_COLUMNS) - {"num_samples"})
    use_images = all(row.get("images_seen") not in (None, "") for row in rows)
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4 * max(len(metrics), 1), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for weights in sorted({row["weights"] for row in rows}):
            pts = [r for r in rows if r["weights"] == weights and r.get(metric) not in (None, "")]
            pts.sort(key=lambda r: int(r["step"]))
            xs = [float(r["images_seen"] if use_images else r["step"]) for r in pts]
            ax.plot(xs, [float(r[metric]) for r in pts], marker="o", label=weights)
        ax.set_title(metric)
        ax.set_xlabel("images seen" if use_images else "step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def fid_settings(run_cfg, num_samples: int | None = None, extractor: str | None = None) -> dict:
    """The FID protocol of a run, from its stored config (callbacks.fid), with optional overrides."""
    from hydra.utils import instantiate

    from ditlab.inference import Guidance

    fid = run_cfg.get("callbacks", {}).get("fid") or {}
    kind = extractor or fid.get("extractor") or run_cfg.data.reference.get("extractor")
    if not kind:
        raise ValueError(
            "the run has no FID extractor (callbacks.fid.extractor is null); expected extractor=clf|inception"
        )
    prepared = Path(run_cfg.data.prepared_dir)
    weights = fid.get("weights_path") or (str(prepared / "classifier") if kind == "clf" else None)
    reference = (fid.get("reference") if not extractor else None) or prepared / f"reference_{kind}.npz"
    sampler_cfg = fid.get("sampler") or run_cfg.sampler
    return dict(
        sampler=instantiate(sampler_cfg),
        guidance=Guidance(fid.get("cfg_scale", 1.0), fid.get("guided_channels"), fid.get("guidance_interval")),
        num_samples=int(num_samples or fid.get("num_samples", 1000)),
        batch_size=int(fid.get("batch_size", 250)),
        seed=int(fid.get("seed", run_cfg.get("seed", 0))),
        metrics=tuple(fid.get("metrics", ("fid",))),
        extractor=kind,
        weights_path=weights,
        reference=Path(reference),
    )


@torch.no_grad()
def score_checkpoint(path: Path, ema: bool, settings_of, device: str) -> dict[str, float]:
    from ditlab.data.transforms import model_range_to_uint8
    from ditlab.inference import load_model, sample_labels
    from ditlab.metrics.fidelity import Extractor, compute_metrics
    from ditlab.metrics.reference import ReferenceStats

    bundle = load_model(path, ema=ema).to(device)
    s = settings_of(bundle.run_config)
    s["sampler"].check(bundle.objective)
    reference = ReferenceStats.load(s["reference"], s["extractor"])
    labels = sample_labels(bundle.num_classes, s["num_samples"], s["seed"])
    images = bundle.generate(labels, s["sampler"], s["guidance"], s["seed"], batch_size=s["batch_size"])
    out = Extractor(s["extractor"], s["weights_path"], device=device)(model_range_to_uint8(images).permute(0, 3, 1, 2))
    out["labels"] = labels
    results = compute_metrics(out, reference, s["metrics"], labels=labels if s["extractor"] == "clf" else None)
    results["num_samples"] = s["num_samples"]
    return results


def score_run(
    run_dir: str | Path,
    ema: bool = True,
    num_samples: int | None = None,
    extractor: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[Path, int]:
    """Score the run's checkpoints not scored yet; returns (the CSV path, how many were scored now)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run={str(run_dir)!r} is not a directory; expected a ditlab training run dir")
    csv_path, weights = run_dir / CSV_NAME, "ema" if ema else "raw"
    rows = read_curve(csv_path)
    done = {(int(r["step"]), r["weights"]) for r in rows}
    todo = [c for c in run_checkpoints(run_dir) if (c[0], weights) not in done]
    log.info(f"{run_dir}: {len(todo)} checkpoint(s) to score, {len(done)} already in {CSV_NAME}")
    for step, seen, path in tqdm(todo, desc="checkpoints", unit="ckpt", disable=not progress):
        results = score_checkpoint(path, ema, lambda cfg: fid_settings(cfg, num_samples, extractor), device)
        rows.append(
            {
                "step": step,
                "images_seen": "" if seen is None else seen,
                "weights": weights,
                "checkpoint": path.name,
                **results,
            }
        )
        write_curve(rows, csv_path)  # after each checkpoint: an interrupted scoring keeps what it did
        log.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items() if isinstance(v, float)))
    if rows and (todo or not (run_dir / PNG_NAME).is_file()):
        plot_curve(read_curve(csv_path), run_dir / PNG_NAME)
    return csv_path, len(todo)
