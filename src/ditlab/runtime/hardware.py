"""Which hardware a run uses: the default trainer (``trainer=auto``) picks it, every trainer is checked.

``python -m ditlab.train trainer.devices=8`` runs DDP in bf16-mixed on 8 GPUs when they are there,
and fp32 processes on the CPU otherwise; ``describe`` is the line ``ditlab.train`` logs first so a
user sees at once which it was. Asking for more devices than the machine has is one clear error
(Lightning would otherwise spawn one process per requested CPU "device", 64 on a 2-core machine
hang, or fail deep inside its connector with a traceback).
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

# forward_sync_buffers off: DDP would broadcast the module's buffers (the EMA's update count) from
# rank 0 before every forward, a collective per step; they are synced once at the start and then
# updated alike on every rank.
DDP = {
    "_target_": "lightning.pytorch.strategies.DDPStrategy",
    "find_unused_parameters": False,
    "gradient_as_bucket_view": True,
    "forward_sync_buffers": False,
}


def available(accelerator: str) -> int:
    """How many devices of this kind the machine has (CPU: one process per core)."""
    if accelerator in ("gpu", "cuda"):
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def device_count(devices) -> int:
    """How many devices ``trainer.devices`` names: 4, "4", "0,1" or [0, 1] (not "auto")."""
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices)
    if isinstance(devices, str):  # "0,1": explicit indices
        return len([d for d in devices.split(",") if d.strip()])
    return len(list(devices))


def check_hardware(accelerator: str, devices) -> None:
    """``accelerator`` (gpu/cuda/cpu, resolved) and ``devices`` must name hardware this machine has."""
    if accelerator in ("gpu", "cuda"):
        have = available("gpu")
        if have == 0:
            raise ValueError(
                f"trainer.accelerator={accelerator} but no CUDA GPU is visible; expected trainer=cpu on this machine"
            )
        what = f"{have} CUDA GPU(s)"
    elif accelerator == "cpu":
        have = available("cpu")
        what = f"{have} CPU cores"
    else:
        return  # tpu, mps, ...: left to Lightning
    wanted = device_count(devices)
    if wanted < 1 or wanted > have:
        raise ValueError(f"trainer.devices={devices} but this machine has {what}; expected 1..{have}")
    if accelerator in ("gpu", "cuda") and isinstance(devices, str) and "," in devices:
        bad = [d for d in devices.split(",") if d.strip() and int(d) >= have]
        if bad:
            raise ValueError(f"trainer.devices={devices}: no GPU {bad[0]}; expected indices 0..{have - 1}")


def select(trainer: DictConfig) -> DictConfig:
    """The trainer config with ``accelerator: auto`` / ``devices: auto`` / ``precision: null`` /
    ``strategy: auto`` resolved, checked against the machine (ValueError, one line)."""
    cfg = OmegaConf.create(OmegaConf.to_container(trainer, resolve=True))
    with open_dict(cfg):
        if cfg.get("accelerator", "auto") == "auto":
            cfg.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
        kind = "gpu" if cfg.accelerator in ("gpu", "cuda") else cfg.accelerator
        if cfg.get("devices", 1) in ("auto", -1, "-1"):
            cfg.devices = available(kind) if kind == "gpu" else 1
        check_hardware(cfg.accelerator, cfg.devices)
        if cfg.get("precision") is None:
            bf16 = kind == "gpu" and torch.cuda.is_bf16_supported()
            cfg.precision = ("bf16-mixed" if bf16 else "16-mixed") if kind == "gpu" else "32-true"
        strategy = cfg.get("strategy", "auto")
        several = device_count(cfg.devices) * cfg.get("num_nodes", 1) > 1
        if strategy == "ddp" or (strategy == "auto" and several):  # "ddp": Lightning's, with its buffer broadcast
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
