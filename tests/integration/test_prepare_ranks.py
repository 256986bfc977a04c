"""``ditlab.prepare`` with two ranks (one process each, with the variables torchrun sets): each encodes
its share, rank 0 writes meta.json only after every rank's shards (and after its own reference
statistics), rank 1 returns only once meta.json is there; a rank that dies leaves no meta.json, and a
rerun resumes to the data one process prepares."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from helpers import cli_env, folder_overrides, make_image_folder, read_meta


def _args(folder: Path, out: Path, log_dir: Path) -> list[str]:
    """helpers.prepare_tiny_folder's data (3 classes of 8x8 RGB, identity 'latents'), with a clf
    reference whose classifier rank 0 trains for 3 s after the shards: the window rank 1 must wait."""
    return folder_overrides(
        folder,
        out,
        extra=[
            "encode.batch_size=8",
            "data.reference.extractor=clf",
            "data.reference.classifier_steps=20",
            f"hydra.run.dir={log_dir}",
        ],
    )


def _rank(rank: int, args: list[str], cwd: Path, **env) -> subprocess.Popen:
    ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
    return subprocess.Popen(
        [sys.executable, "-m", "ditlab.prepare", *args],
        cwd=cwd,
        env=cli_env(**ranks, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _items(prepared: Path, split: str) -> list[tuple[bytes, int]]:
    from litdata import StreamingDataset

    data = StreamingDataset(str(prepared / split))
    return sorted((np.asarray(data[i]["latent"]).tobytes(), int(data[i]["label"])) for i in range(len(data)))


def test_two_ranks_meet_through_the_prepared_dir(prepared, tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=16, size=(8, 8), corrupt=False)
    out = tmp_path / "latents"

    # rank 1 dies after its first batch: rank 0 encodes its share and waits for rank 1's shards
    # (no meta.json: the dir is not prepared); then it is stopped, as torchrun's agent stops it
    rank0 = _rank(0, _args(folder, out, tmp_path / "log0"), tmp_path)
    rank1 = _rank(1, _args(folder, out, tmp_path / "log1"), tmp_path, DITLAB_FAULT="prepare_batch@1:kill")
    assert rank1.wait(timeout=120) == -signal.SIGKILL
    deadline = time.time() + 120
    while not (out / "train.tmp" / "0.index.json").exists() and time.time() < deadline and rank0.poll() is None:
        time.sleep(0.1)
    assert (out / "train.tmp" / "0.index.json").exists(), rank0.stderr.read()[-3000:] if rank0.poll() else ""
    time.sleep(1.0)
    assert rank0.poll() is None and not (out / "meta.json").exists()
    rank0.kill()
    rank0.wait(timeout=30)
    assert not (out / "meta.json").exists() and not (out / "train").exists()

    # the rerun resumes; rank 1 returns only once rank 0 has written meta.json (rank 0 trains the
    # classifier for its reference statistics first: a rank 1 that did not wait would be gone before)
    rank0 = _rank(0, _args(folder, out, tmp_path / "log0b"), tmp_path)
    rank1 = _rank(1, _args(folder, out, tmp_path / "log1b"), tmp_path)
    _, err1 = rank1.communicate(timeout=300)
    assert rank1.returncode == 0, err1[-3000:]
    assert (out / "meta.json").is_file() and (out / "reference_clf.npz").is_file()
    _, err0 = rank0.communicate(timeout=300)
    assert rank0.returncode == 0, err0[-3000:]

    # one consistent output: the counts and the items one process prepares from the same images
    ours, single = read_meta(out), read_meta(prepared)
    assert ours["splits"] == single["splits"] and ours["classes"] == single["classes"]
    for split in ("train", "val"):
        assert _items(out, split) == _items(prepared, split)
    assert not list(out.glob("*.tmp")) and not (out / ".rank_counts").exists()
