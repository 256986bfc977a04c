"""Tiny training runs for the fault tests: in-process (fast) or as ``python -m ditlab.train``
subprocesses (for kill -9, signals and exit codes), and exact comparisons of their checkpoints.

A fast EMA (decay 0.5) and lr 1e-2 make every update visible: an EMA one update behind, or a
resumed run that redraws a different random stream, changes the compared tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import open_dict

from ditlab.training import faults
from helpers import compose_cfg, tiny_overrides

STEPS = 8
FAST = [
    "module.ema_decay=0.5",
    "optim.optimizer.lr=1e-2",
    "callbacks.sample_grid=null",
    "callbacks.fid=null",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.checkpoint.keep_last=0",
    "ckpt_path=last",
]


def overrides(prepared, root: Path, steps: int = STEPS, extra=()) -> list[str]:
    return tiny_overrides(prepared, root, steps, [*FAST, *extra])


def compose(prepared, out_dir: Path, steps: int = STEPS, extra=()):
    cfg = compose_cfg("train", overrides(prepared, out_dir.parent, steps, extra))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def train_in_process(cfg):
    from ditlab.train import train

    faults.reset()
    return train(cfg)


def cli_env(**extra) -> dict:
    # The same thread count as this process: CPU float reductions then match bit for bit.
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def run_command(module: str, args: list[str], cwd: Path, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_cli(prepared, out_dir: Path, steps: int = STEPS, extra=(), timeout: float = 120, **env):
    args = [*overrides(prepared, out_dir.parent, steps, extra), f"hydra.run.dir={out_dir}"]
    return run_command("ditlab.train", args, out_dir.parent, timeout, **env)


def full_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights, EMA, optimizer and LR-scheduler state of a checkpoint, flattened to named tensors."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    flat = {f"state_dict/{k}": v for k, v in ckpt["state_dict"].items()}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)
        elif isinstance(obj, (int, float)):
            flat[prefix] = torch.tensor(obj)

    walk("optimizer", ckpt["optimizer_states"])
    walk("lr_schedulers", ckpt.get("lr_schedulers", []))
    flat["global_step"] = torch.tensor(ckpt["global_step"])
    return flat


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = full_state(a), full_state(b)
    assert sa.keys() == sb.keys()
    assert any(k.startswith("state_dict/ema.net.") for k in sa) and any(k.startswith("optimizer/") for k in sa)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def temps(directory: Path) -> list[Path]:
    return list(directory.glob(".*.tmp-*")) if directory.is_dir() else []
