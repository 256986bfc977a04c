"""Which hardware a run uses: the default trainer (``trainer=auto``) picks it, every trainer is checked.

``python -m ditlab.train trainer.devices=8`` runs DDP in bf16-mixed on 8 GPUs when they are there,
and fp32 processes on the CPU otherwise; ``describe`` is the line ``ditlab.train`` logs first so a
user sees at once which it was. Asking for more devices than the machine has is one clear error
(Lightning would otherwise fail deep inside, or on the CPU start more processes than cores and hang).
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ditlab.training.preflight import check_hardware

DDP = {
    "_target_": "lightning.pytorch.strategies.DDPStrategy",
    "find_unused_parameters": False,
    "gradient_as_bucket_view": True,
}


def available(accelerator: str) -> int:
    """How many devices of this kind the machine has (CPU: one process per core)."""
    if accelerator in ("gpu", "cuda"):
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def _count(devices) -> int:
    """How many devices ``trainer.devices`` names: 4, "4", "0,1" or [0, 1]."""
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices)
    return len([d for d in str(devices).split(",") if d.strip()]) if isinstance(devices, str) else len(devices)


def select(trainer: DictConfig) -> DictConfig:
    """The trainer config with ``accelerator: auto`` / ``precision: null`` / ``strategy: auto`` resolved.

    Raises ValueError (one line, ``preflight.check_hardware``) when more devices are asked for than exist.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(trainer, resolve=True))
    with open_dict(cfg):
        if cfg.get("accelerator", "auto") == "auto":
            cfg.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
        kind = "gpu" if cfg.accelerator in ("gpu", "cuda") else cfg.accelerator
        devices = cfg.get("devices", 1)
        if devices in ("auto", -1, "-1"):
            cfg.devices = devices = available(kind) if kind == "gpu" else 1
        check_hardware(cfg)  # more devices than exist: one line (training/preflight.py, shared with build)
        if cfg.get("precision") is None:
            bf16 = kind == "gpu" and torch.cuda.is_bf16_supported()
            cfg.precision = ("bf16-mixed" if bf16 else "16-mixed") if kind == "gpu" else "32-true"
        count = _count(devices)
        if cfg.get("strategy", "auto") == "auto" and count * cfg.get("num_nodes", 1) > 1:
            cfg.strategy = dict(DDP)
    return cfg


def describe(trainer: DictConfig) -> str:
    """One line: devices, strategy, precision (of a config ``select`` resolved)."""
    devices, nodes = trainer.devices, trainer.get("num_nodes", 1)
    strategy = trainer.strategy
    name = strategy if isinstance(strategy, str) else str(strategy["_target_"]).rsplit(".", 1)[-1]
    if trainer.accelerator in ("gpu", "cuda"):
        where = f"{devices} x {torch.cuda.get_device_name() if torch.cuda.is_available() else 'GPU'}"
    else:
        note = "" if torch.cuda.is_available() else ", no GPU found"
        where = f"CPU ({devices} process{'es' if devices != 1 else ''}{note})"
    nodes = f" x {nodes} nodes" if nodes > 1 else ""
    return f"hardware: {where}{nodes}, strategy {name}, precision {trainer.precision}"
