"""Checks a training run makes before it starts anything: does the hardware exist, does the
prepared data fit the configured VAE. Each failure is one line (ValueError)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

import torch


def _count(devices, available: int, what: str) -> int:
    if devices in ("auto", -1, "-1"):
        return available
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices)
    if isinstance(devices, str):  # "0,1": explicit indices
        return len([d for d in devices.split(",") if d.strip()])
    return len(list(devices))


def check_hardware(trainer_cfg) -> None:
    """``trainer.accelerator`` / ``trainer.devices`` / ``trainer.num_nodes`` must name hardware this
    machine has: Lightning would otherwise spawn one process per requested CPU "device" (64 on a
    2-core machine hang) or fail deep inside its connector with a traceback."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            raise ValueError(
                f"trainer.accelerator={accelerator} but no CUDA GPU is visible; expected trainer=cpu on this machine"
            )
        what = f"{available} CUDA GPU(s)"
    elif accelerator == "cpu":
        available = os.cpu_count() or 1
        what = f"{available} CPU cores"
    elif accelerator == "auto":
        available = torch.cuda.device_count() or (os.cpu_count() or 1)
        what = f"{available} device(s)"
    else:
        return  # tpu, mps, ...: left to Lightning
    wanted = _count(devices, available, what)
    if wanted < 1 or wanted > available:
        raise ValueError(f"trainer.devices={devices} but this machine has {what}; expected 1..{available}")
    if accelerator in ("gpu", "cuda") and isinstance(devices, str) and "," in devices:
        bad = [d for d in devices.split(",") if d.strip() and int(d) >= available]
        if bad:
            raise ValueError(f"trainer.devices={devices}: no GPU {bad[0]}; expected indices 0..{available - 1}")


def check_vae_matches(vae_cfg, meta: dict, prepared_dir) -> None:
    """The prepared latents were made with the VAE the config names (else decoding them is garbage)."""
    stored = meta.get("vae", {})
    if "name" in stored and stored["name"] != vae_cfg.name:
        raise ValueError(
            f"vae={vae_cfg.name} but {prepared_dir} was prepared with vae={stored['name']}; "
            f"expected vae={stored['name']} (or another data.prepared_dir)"
        )
    target = str(vae_cfg.codec.get("_target_", ""))
    kind = {"IdentityVAE": "identity", "PretrainedVAE": "pretrained", "SmallVAERecipe": "small_kl"}.get(
        target.rsplit(".", 1)[-1]
    )
    if kind and stored.get("kind") and stored["kind"] != kind:
        raise ValueError(
            f"vae={vae_cfg.name} ({kind}) but {prepared_dir} holds {stored['kind']} latents; "
            "expected the vae it was prepared with"
        )
    vae_info = Path(prepared_dir) / "vae" / "ditlab_vae.json"  # the small VAE prepare trained, and its recipe
    if kind == "small_kl" and vae_info.is_file():
        from hydra.utils import instantiate

        from ditlab.training.fit_vae import check_recipe

        check_recipe(json.loads(vae_info.read_text()), instantiate(vae_cfg.codec).recipe(), vae_info.parent)
    if kind == "pretrained" and stored.get("path") and stored["path"] != vae_cfg.codec.path:
        raise ValueError(
            f"vae.codec.path={vae_cfg.codec.path} but {prepared_dir} was encoded with {stored['path']}; "
            "expected the same VAE"
        )


def die_with_parent() -> None:
    """In a DDP child rank (Linux): get SIGTERM when the launching process dies, even by kill -9,
    so that no orphaned rank keeps memory and cores (seen: 63 orphans of a devices=64 run)."""
    if sys.platform.startswith("linux") and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
