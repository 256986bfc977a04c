"""What a number was made with beyond its settings: file hashes, library versions, where ``ditlab.sample``
records its sampling protocol, and the commands that make the number again.

``ditlab.sample`` writes a sampling record beside its samples (``samples_NxHxWxC.json`` beside
``samples_NxHxWxC.npz``; ``samples.json`` in a folder of PNGs): checkpoint and step, weights, sampler,
guidance, sample count, seed, labels, batch size, processes, device and versions. ``ditlab.evaluate``
copies it into ``results.json`` with the measuring half (``FIDProtocol.describe``) and prints the two
commands that reproduce the number (``sample_command``, ``evaluate_command``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shlex
from pathlib import Path

import numpy as np
import torch

from ditlab import __version__

HASH_CHUNK = 1 << 24  # bytes read at a time: a 10 GB samples file never sits in memory
SAMPLING_RECORD_IN_FOLDER = "samples.json"


def sha256_of(path: str | Path | None, suffixes: tuple[str, ...] | None = None) -> str | None:
    """The sha256 of a file; of a folder, over its files' relative names and contents in name order
    (only the files ending in one of ``suffixes``, when given). None for None."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; expected a file or folder to hash")
    digest = hashlib.sha256()
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (not suffixes or p.suffix.lower() in suffixes))
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """The versions a number depends on: ditlab, torch (and its CUDA), torch-fidelity, numpy."""
    versions = {
        "ditlab": __version__,
        "torch": str(torch.__version__),  # a TorchVersion: yaml would write a python object
        "torch-fidelity": importlib.metadata.version("torch-fidelity"),
        "numpy": str(np.__version__),
    }
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    return versions


def sampling_record_path(samples: str | Path) -> Path:
    """Where ``ditlab.sample`` records how ``samples`` (an .npz or a folder of PNGs) were drawn."""
    samples = Path(samples)
    return samples / SAMPLING_RECORD_IN_FOLDER if samples.is_dir() else samples.with_suffix(".json")


def sampler_values(sampler) -> dict:
    """A ``Sampler`` as plain values: ``Sampler(**values)`` builds it again."""
    return {"name": sampler.name, "steps": sampler.steps, **sampler.options}


def guidance_values(guidance) -> dict:
    """A ``Guidance`` as plain values: ``Guidance(**values)`` builds it again."""
    interval = None if guidance.interval is None else list(guidance.interval)
    return {"scale": guidance.scale, "channels": guidance.channels, "interval": interval}


def override(key: str, value) -> str:
    """One Hydra override ``key=value`` with the value in Hydra's syntax (null, lists, floats as written)."""
    return f"{key}={hydra_value(value)}"


def hydra_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def sample_command(record: dict) -> str:
    """The ``ditlab.sample`` command that draws the samples of a sampling ``record`` again: every
    choice explicit (the sampler through ``sampler=base``, whose name, steps and options are then set)."""
    sampler = dict(record["sampler"])
    args = [
        override("ckpt", record["checkpoint"]["path"]),
        override("ema", record["checkpoint"]["weights"] == "ema"),
        override("num_samples", record["num_samples"]),
        override("batch_size", record["batch_size"]),
        "sampler=base",
        override("sampler.name", sampler.pop("name")),
        override("sampler.steps", sampler.pop("steps")),
        *(override(f"+sampler.{key}", value) for key, value in sampler.items()),
        *(override(f"guidance.{key}", value) for key, value in record["guidance"].items()),
        override("labels", record["labels"]),
        override("seed", record["seed"]),
        override("device", record["device"]),
        override("format", record["format"]),
        override("out", record["out"]),
    ]
    for key in ("latent_stats", "num_heads", "family", "vae_path"):  # a released checkpoint's reading options
        if record.get(key):
            args.insert(2, override(key, record[key]))
    world = record.get("world_size", 1)
    launcher = ["python", "-m"] if world == 1 else ["torchrun", f"--nproc_per_node={world}", "-m"]
    return shlex.join([*launcher, "ditlab.sample", *args])


def evaluate_command(samples: str | Path, protocol: dict, device: str) -> str:
    """The ``ditlab.evaluate`` command that measures ``samples`` as ``protocol`` (``FIDProtocol.describe``
    with a prepared dir) says."""
    args = [
        override("samples", samples),
        override("reference", protocol["reference"]),
        override("extractor", protocol["extractor"]),
        override("weights_path", protocol["weights_path"]),
        override("metrics", protocol["metrics"]),
        override("kid_subset_size", protocol["kid_subset_size"]),
        *(override(f"uncertainty.{key}", value) for key, value in protocol.get("uncertainty", {}).items()),
        override("device", device),
    ]
    return shlex.join(["python", "-m", "ditlab.evaluate", *args])
