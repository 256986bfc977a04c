"""prepare killed half-way (kill -9 after its first batch) and rerun gives the same shards as an
uninterrupted prepare: nothing half-written is mistaken for finished work."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from omegaconf import open_dict

from ditlab.prepare import prepare_from_config
from helpers import compose_cfg, folder_overrides, make_image_folder, run_command


def _args(folder: Path, out: Path) -> list[str]:  # what helpers.prepare_tiny_folder uses, smaller batches
    return folder_overrides(folder, out, extra=["encode.batch_size=8"])


def _content(prepared: Path) -> dict:
    files = {"meta.json": json.loads((prepared / "meta.json").read_text())}
    for split in ("train", "val"):
        index = json.loads((prepared / split / "index.json").read_text())
        index.pop("updated_at", None)
        files[f"{split}/index.json"] = index
        for chunk in sorted((prepared / split).glob("chunk-*.bin")):
            files[f"{split}/{chunk.name}"] = chunk.read_bytes()
    return files


def test_prepare_killed_half_way_then_rerun_equals_uninterrupted(prepared, tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=16, size=(8, 8), corrupt=False)
    out = tmp_path / "latents"
    killed = run_command(
        "ditlab.prepare",
        [*_args(folder, out), f"hydra.run.dir={tmp_path / 'log'}"],
        tmp_path,
        DITLAB_FAULT="prepare_batch@2:kill",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert out.is_dir() and not (out / "meta.json").exists() and not (out / "train").exists()  # only a .tmp split
    cfg = compose_cfg("prepare", _args(folder, out))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    prepare_from_config(cfg)
    assert not list(out.glob("*.tmp"))
    assert _content(out) == _content(prepared)
