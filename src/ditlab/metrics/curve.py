"""A run's FID curve: every checkpoint of a training run scored with the run's own ``FIDProtocol``
(the one its FID callback measured with: sampler, guidance, sample count, seed, extractor and
reference, as each checkpoint's record holds it), written to ``<run>/fid_curve.csv`` (step, images
seen, metrics) and ``<run>/fid_curve.png``.

A rerun scores only the checkpoints not in the CSV yet (keyed by step and weights), so the curve
of a run that is still training can be brought up to date cheaply.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ditlab.data.prepared import PreparedDir
from ditlab.diffusion import Guidance, Sampler
from ditlab.inference import load_model
from ditlab.metrics.protocol import FIDProtocol
from ditlab.metrics.uncertainty import Uncertainty, derived_name
from ditlab.runtime.checkpoints import read_checkpoint
from ditlab.runtime.files import atomic_path
from ditlab.runtime.record import CheckpointRecord

log = logging.getLogger("ditlab.evaluate")

CSV_NAME, PNG_NAME = "fid_curve.csv", "fid_curve.png"
# <run dir>/fid_reference/: the reference statistics (and, for fid_clf, the classifier) the run's FID
# was measured against, laid out as in a prepared dir; the FID callback copies them there once, so
# that the curve is measured without the prepared dir.
RUN_REFERENCE_DIR = "fid_reference"
KEY_COLUMNS = ["step", "images_seen", "weights", "checkpoint"]


def checkpoints_of(run_dir: Path) -> list[tuple[int, int | None, Path]]:
    """(step, images seen, path) of each distinct checkpoint of a run, by step; a ``last.ckpt`` that
    repeats a periodic checkpoint's step is left out."""
    paths = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    if not paths:
        raise FileNotFoundError(
            f"run_dir={str(run_dir)!r} has no checkpoints/*.ckpt; expected a ditlab training run dir"
        )
    found: dict[int, tuple[int, int | None, Path]] = {}
    for path in paths:
        ckpt = read_checkpoint(path, mmap=True)  # mmap: no full read
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
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=KEY_COLUMNS + metric_columns, restval="")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["weights"], int(r["step"]))))


def plot_curve(rows: list[dict], path: Path) -> None:
    """One panel per metric against images seen (steps where a checkpoint does not record them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = {k for row in rows for k in row} - set(KEY_COLUMNS) - {"num_samples"}
    metrics = sorted(k for k in columns if not derived_name(k))  # intervals are drawn with their metric
    use_images = all(row.get("images_seen") not in (None, "") for row in rows)
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4 * max(len(metrics), 1), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for weights in sorted({row["weights"] for row in rows}):
            pts = [r for r in rows if r["weights"] == weights and r.get(metric) not in (None, "")]
            pts.sort(key=lambda r: int(r["step"]))
            xs = [float(r["images_seen"] if use_images else r["step"]) for r in pts]
            line = ax.plot(xs, [float(r[metric]) for r in pts], marker="o", label=weights)[0]
            band = [r for r in pts if r.get(f"{metric}_ci_low") not in (None, "")]
            if band:  # the interval of each point (fid_protocol.uncertainty)
                bx = [float(r["images_seen"] if use_images else r["step"]) for r in band]
                lows = [float(r[f"{metric}_ci_low"]) for r in band]
                highs = [float(r[f"{metric}_ci_high"]) for r in band]
                ax.fill_between(bx, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(metric)
        ax.set_xlabel("images seen" if use_images else "step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def recorded_protocol(record: CheckpointRecord) -> FIDProtocol | None:
    """The FID protocol a run measured with, as its checkpoint's record holds it (None: no FID)."""
    if record.fid_protocol is None:
        return None
    values = record.fid_protocol
    sampler = None if values.get("sampler") is None else Sampler(**values["sampler"])
    built = {"sampler": sampler, "guidance": Guidance(**values["guidance"])}
    if values.get("uncertainty") is not None:  # runs before fid_protocol.uncertainty: its defaults
        built["uncertainty"] = Uncertainty(**values["uncertainty"])
    return FIDProtocol(**{**values, **built})


def run_protocol(record: CheckpointRecord, num_samples: int | None = None, extractor: str | None = None) -> FIDProtocol:
    """The run's ``recorded_protocol`` with optional overrides; another ``extractor`` measures against
    that extractor's default reference and weights."""
    protocol = recorded_protocol(record)
    if protocol is None:
        raise ValueError(
            "the checkpoint records no FID protocol (its run had no FID settings); expected a run with one"
        )
    if extractor and extractor != protocol.extractor:  # another feature space: its default reference and weights
        protocol = replace(protocol, extractor=extractor, reference=None, weights_path=None)
    if num_samples:
        protocol = replace(protocol, num_samples=num_samples)
    if not protocol.extractor:
        raise ValueError(
            "the run has no FID extractor (fid_protocol.extractor is null); expected extractor=clf|inception"
        )
    return protocol


def measured_against(run_dir: Path, protocol: FIDProtocol, record: CheckpointRecord) -> tuple[FIDProtocol, PreparedDir]:
    """Where the run's reference statistics (and classifier) are: the copy in the run dir when it holds
    the protocol's extractor (runs since they were copied), else the run's prepared dir."""
    own = PreparedDir(run_dir / RUN_REFERENCE_DIR)
    if protocol.extractor and own.reference(protocol.extractor).is_file():
        weights = None if protocol.extractor == "clf" else protocol.weights_path  # clf: the copied classifier
        return replace(protocol, reference=None, weights_path=weights), own
    return protocol, PreparedDir(record.prepared_dir)


@torch.no_grad()
def score_checkpoint(path: Path, ema: bool, num_samples: int | None, extractor: str | None, device: str) -> dict:
    """The run's protocol measured on one checkpoint's weights (and without guidance too when the
    protocol asks for it: ``*_unguided`` columns)."""
    model = load_model(path, ema=ema).to(device)
    protocol = run_protocol(model.record, num_samples, extractor)
    protocol, prepared = measured_against(path.parent.parent, protocol, model.record)
    features_of = protocol.make_extractor(prepared, device)
    reference = protocol.load_reference(prepared, features_of)
    labels = protocol.labels(model.num_classes)
    indices = torch.arange(len(labels))
    results = {}
    for suffix, variant in protocol.variants():
        images = variant.generate(
            model.net, model.objective, model.codec, model.num_classes, labels, indices, model.latent_shape, device
        )
        results.update(variant.measure(features_of(images), reference, labels, suffix, device))
    results["num_samples"] = protocol.num_samples
    return results


def score_checkpoints(
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
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} is not a directory; expected a ditlab training run dir")
    csv_path, weights = run_dir / CSV_NAME, "ema" if ema else "raw"
    rows = read_curve(csv_path)
    done = {(int(r["step"]), r["weights"]) for r in rows}
    todo = [c for c in checkpoints_of(run_dir) if (c[0], weights) not in done]
    log.info(f"{run_dir}: {len(todo)} checkpoint(s) to score, {len(done)} already in {CSV_NAME}")
    for step, seen, path in tqdm(todo, desc="checkpoints", unit="ckpt", disable=not progress):
        results = score_checkpoint(path, ema, num_samples, extractor, device)
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
