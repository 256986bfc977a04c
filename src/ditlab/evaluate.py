"""``python -m ditlab.evaluate samples=... reference=...``: ADM's suite (FID, sFID, IS, precision,
recall) and KID of samples, written to ``results.json`` beside them with the protocol behind the numbers.

The reference is an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``: statistics and 10K
reference images), a ditlab statistics file or a prepared dir (its ``reference_<extractor>.npz``). A
metric the reference cannot give is skipped with its reason, in the output and in results.json.

``results.json`` (beside the samples; ``out=`` elsewhere) holds one entry per evaluation of these
samples (an evaluation with the same samples, reference, extractor and metrics replaces its entry):
the metrics, the skipped ones, the protocol (the sampling record ``ditlab.sample`` wrote beside the
samples with the measuring half, ``FIDProtocol.describe``: reference and extractor weights with their
sha256, library versions), a one-line Markdown row for papers and the two commands that make the
number again.

``python -m ditlab.evaluate run_dir=<run dir>``: the run's FID curve, every checkpoint scored with the
run's own FID protocol (``ditlab.metrics.curve``) into ``fid_curve.csv`` and ``fid_curve.png``."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from ditlab.data.prepared import PreparedDir, reference_source
from ditlab.diffusion import Guidance, Sampler
from ditlab.inference import CLASS_DRAWS
from ditlab.metrics.adm_reference import reference_image_size
from ditlab.metrics.curve import read_curve, score_checkpoints
from ditlab.metrics.fidelity import metric_suffix
from ditlab.metrics.protocol import FIDProtocol
from ditlab.metrics.provenance import evaluate_command, sampling_record_path, sha256_of
from ditlab.metrics.uncertainty import EXTRAPOLATED, derived_name
from ditlab.runtime.errors import exit_on_error, hydra_command
from ditlab.runtime.files import write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESULTS_NAME = "results.json"
# how papers name the metrics (Markdown row); a feature space other than Inception's is appended
PAPER_NAMES = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall", "kid": "KID"}
SHORT_HASH = 12  # hex digits of a sha256 in the Markdown row (results.json has them all)


def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (N, C, H, W) images (and labels when stored) from an ADM .npz or a folder of images."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ValueError(f"{str(path)!r} has no 'arr_0'; expected ADM's format (uint8 N x H x W x C)")
            arr = data["arr_0"]
            labels = torch.from_numpy(data["labels"]) if "labels" in data else None
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise ValueError(f"{str(path)!r}: arr_0 is {arr.dtype} {arr.shape}; expected uint8 (N, H, W, C)")
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), labels
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images in {str(path)!r}")
        arrays = [np.array(Image.open(f)) for f in files]
        arr = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), None
    raise FileNotFoundError(f"samples={str(path)!r} is neither an .npz file nor a folder of images")


def read_sampling_record(samples: Path, count: int) -> dict | None:
    """What ``ditlab.sample`` recorded beside ``samples`` (None when nothing is recorded there)."""
    path = sampling_record_path(samples)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected the sampling record of ditlab.sample") from err
    if record.get("num_samples") != count:
        raise ValueError(
            f"{path} records {record.get('num_samples')} samples but {samples.name} holds {count}; expected the "
            "record ditlab.sample wrote with these samples"
        )
    return record


def measuring_protocol(cfg: DictConfig, sampling: dict | None, count: int, reference: str | None) -> FIDProtocol:
    """The FID protocol of these samples: the sampling half from their record, the measuring half
    from the command line; ``reference``: the statistics file (None: a prepared dir's own statistics)."""
    drawn = {}
    if sampling is not None:
        drawn = {
            "sampler": Sampler(**sampling["sampler"]),
            "guidance": Guidance(**sampling["guidance"]),
            "seed": sampling["seed"],
            "batch_size": sampling["batch_size"],
        }
    return FIDProtocol(
        extractor=cfg.extractor or "inception",
        num_samples=count,
        reference=reference,
        weights_path=cfg.weights_path,
        metrics=tuple(cfg.metrics),
        kid_subset_size=cfg.kid_subset_size,
        uncertainty=instantiate(cfg.uncertainty),
        **drawn,
    )


def protocol_record(protocol: FIDProtocol, prepared: PreparedDir, sampling: dict | None, device: str) -> dict:
    """``FIDProtocol.describe`` (hashes, versions) with what only the sampling record knows."""
    described = protocol.describe(prepared)
    described.pop("also_unguided")  # a training-time option: these samples are what they are
    described["evaluation_device"] = device
    if sampling is None:
        unknown = "unknown: no sampling record of ditlab.sample beside the samples"
        described.update(sampler=None, sampler_text=unknown, guidance=None, guidance_text=unknown)
        described.update(seed=None, batch_size=None, checkpoint=None, class_draw=None)
        return described
    labels = sampling.get("labels")  # how ditlab.sample drew the classes, not this command's default
    described["class_draw"] = labels if labels in CLASS_DRAWS else "uniform" if labels is None else "given"
    for key in ("checkpoint", "vae_path", "labels", "world_size", "device", "device_name", "format"):
        described[key] = sampling.get(key)
    described["sampling_versions"] = sampling.get("versions")
    return described


def markdown_row(metrics: dict[str, float], protocol: dict) -> tuple[str, str]:
    """(header, row): one Markdown table row with the metrics and the protocol behind them."""
    ckpt = protocol.get("checkpoint")
    weights = protocol.get("weights_sha256")
    columns = {
        "checkpoint": checkpoint_text(ckpt),
        "weights": "unknown" if ckpt is None else ckpt["weights"],
        "sampler": protocol["sampler_text"],
        "guidance": protocol["guidance_text"],
        "samples": str(protocol["num_samples"]),
        "seed": str(protocol["seed"]),
        "reference": f"{Path(protocol['reference']).name} (sha256 {protocol['reference_sha256'][:SHORT_HASH]})",
        "extractor": f"{protocol['extractor_model']} (weights sha256 {weights[:SHORT_HASH] if weights else 'unknown'})",
    }
    suffix = metric_suffix(protocol["extractor"])
    for name, value in metrics.items():
        if derived_name(name):
            continue
        se = metrics.get(f"{name}_se")
        cell = f"{value:.4g}" if se is None else f"{value:.4g} ± {se:.2g}"
        columns[paper_name(name, suffix) + (f" ({protocol['extractor']})" if suffix else "")] = cell
    versions = protocol["versions"]
    columns["versions"] = ", ".join(f"{k} {versions[k]}" for k in ("ditlab", "torch", "torch-fidelity"))
    cells = [str(v).replace("|", "\\|") for v in columns.values()]
    return "| " + " | ".join(columns) + " |", "| " + " | ".join(cells) + " |"


def paper_name(name: str, suffix: str) -> str:
    """fid -> FID, fid_clf -> FID, fid_clf_inf -> FID∞ (Chong & Forsyth's extrapolation)."""
    extrapolated = name.endswith(f"_{EXTRAPOLATED}")
    base = name.removesuffix(f"_{EXTRAPOLATED}")
    base = base.removesuffix(suffix) if suffix else base
    return PAPER_NAMES.get(base, base) + ("∞" if extrapolated else "")


def checkpoint_text(checkpoint: dict | None) -> str:
    if checkpoint is None:
        return "unknown"
    name = Path(checkpoint["path"]).name
    return name if checkpoint["step"] is None else f"{name} (step {checkpoint['step']})"


def results_path(cfg: DictConfig) -> Path:
    """``out=``, else results.json in the samples' folder (the .npz's folder, or the PNG folder)."""
    if cfg.out:
        return Path(cfg.out)
    samples = Path(str(cfg.samples).rstrip("/"))
    return (samples if samples.is_dir() else samples.parent) / RESULTS_NAME


def entry_key(entry: dict) -> tuple:
    """Two evaluations are the same when samples, reference, extractor and metrics are."""
    p = entry["protocol"]
    return (entry["samples"]["path"], p["reference_sha256"], p["extractor"], p["weights_sha256"], tuple(p["metrics"]))


def read_evaluations(path: Path) -> list[dict]:
    """The entries of results.json at ``path`` ([] when there is none yet)."""
    if not path.is_file():
        return []
    try:
        evaluations = json.loads(path.read_text())["evaluations"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a ditlab results.json ({err!r}); expected its 'evaluations' list") from err
    if not isinstance(evaluations, list):
        raise ValueError(f"{path} is not a ditlab results.json; expected its 'evaluations' list")
    return evaluations


def save_entry(path: Path, entry: dict, evaluations: list[dict]) -> None:
    """Write results.json at ``path``: ``evaluations`` with ``entry`` replacing one of the same evaluation."""
    kept = [e for e in evaluations if entry_key(e) != entry_key(entry)]
    write_json(path, {"evaluations": [*kept, entry]})


def check_image_size(images: torch.Tensor, expected: int | None, samples, reference: Path) -> None:
    size = tuple(images.shape[-2:])
    if expected is not None and size != (expected, expected):
        raise ValueError(
            f"samples={samples} are {size[0]}x{size[1]} images but {reference} was computed on "
            f"{expected}x{expected} images; expected samples of the reference's size"
        )


def evaluate(cfg: DictConfig) -> dict:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.get("run_dir"):
        return evaluate_run(cfg, device)
    if cfg.samples is None or cfg.reference is None:
        raise ValueError(
            "nothing to evaluate; expected samples=<.npz or folder> reference=<stats>, or run_dir=<run dir>"
        )
    samples = Path(str(cfg.samples).rstrip("/"))
    out = results_path(cfg)
    evaluations = read_evaluations(out)  # a foreign file there fails now, not after the measuring
    images, labels = load_samples(samples)
    sampling = read_sampling_record(samples, len(images))
    prepared, reference_file = reference_source(cfg.reference)  # local or s3:// (fetched here)
    protocol = measuring_protocol(cfg, sampling, len(images), reference_file)
    path = protocol.check_reference(prepared)  # before any network is built: wrong files fail in one line
    check_image_size(images, reference_image_size(path), cfg.samples, path)
    extractor = protocol.make_extractor(prepared, device, progress=cfg.progress)
    side = protocol.load_reference(prepared, extractor)
    metrics = protocol.measure(extractor(images), side, labels, device=device)
    described = protocol_record(protocol, prepared, sampling, device)
    if prepared.remote:  # the store's object, not this machine's copy of it: the command reruns anywhere
        described["reference"] = prepared.location(path.name)
    header, row = markdown_row(metrics, described)
    entry = {
        "samples": {
            "path": str(samples.resolve()),
            "sha256": sha256_of(samples, suffixes=IMAGE_SUFFIXES),  # a folder: its images only
            "shape": list(images.shape),  # (N, C, H, W)
        },
        "metrics": metrics,
        "skipped": protocol.unavailable(side),
        "protocol": described,
        "markdown": {"header": header, "row": row},
        "reproduce": {
            "sample": None if sampling is None else sampling["command"],
            "evaluate": evaluate_command(samples.resolve(), described, device),
        },
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_entry(out, entry, evaluations)
    print_entry(entry, out)
    return entry


def print_entry(entry: dict, out: Path) -> None:
    metrics = entry["metrics"]
    shown = [name for name in metrics if not derived_name(name)]
    width = max(len(k) for k in [*shown, *entry["skipped"], "metric"])
    level = entry["protocol"].get("uncertainty", {}).get("level")
    print(f"{'metric':<{width}}  " + (f"{'value':<10}  {'se':<6}  {level:.0%} interval" if level else "value"))
    for name in shown:
        line = f"{name:<{width}}  {metrics[name]:<10.6g}"
        if f"{name}_se" in metrics:
            low, high = metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]
            line += f"  {metrics[name + '_se']:<6.2g}  [{low:.4g}, {high:.4g}]"
        print(line)
    for name, reason in entry["skipped"].items():
        print(f"{name:<{width}}  skipped: {reason}")
    print(f"(written to {out})\n")
    header = entry["markdown"]["header"]
    print(header)
    print("|" + "---|" * (header.count(" | ") + 1))
    print(entry["markdown"]["row"] + "\n")
    print("to reproduce:")
    for command in entry["reproduce"].values():
        print(f"  {command}" if command else "  (sampling unknown: no sampling record beside the samples)")


def evaluate_run(cfg: DictConfig, device: str) -> dict:
    csv_path, scored = score_checkpoints(cfg.run_dir, cfg.ema, cfg.num_samples, cfg.extractor, device, cfg.progress)
    rows = read_curve(csv_path)
    print(f"{scored} checkpoint(s) scored now, {len(rows) - scored} reused; curve in {csv_path} and .png")
    return {"scored": scored, "rows": rows}


@hydra_command("ditlab.evaluate", "evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_error("ditlab.evaluate", evaluate, cfg)


if __name__ == "__main__":
    main()
