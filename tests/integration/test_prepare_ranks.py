"""``ditlab.prepare`` with two ranks (the variables torchrun sets): each encodes its share, rank 0
writes meta.json only after every rank's shards (and after its own reference statistics), rank 1
returns only once meta.json is there; a rank that dies leaves no meta.json, and a rerun resumes to
the data one process prepares.

Rank 1 is a process of its own (``python -m ditlab.prepare``, killed with -9 in the first half);
rank 0 runs ``ditlab.prepare``'s stage in this process, with RANK=0 and WORLD_SIZE=2 (a second fresh
process would cost seconds of imports and prove nothing more: the ranks meet through files)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from ditlab.prepare import prepare_from_config
from ditlab.runtime.processes import WaitTimeout
from helpers import cli_env, compose_cfg, folder_overrides, make_image_folder, read_meta

RANKS = {"WORLD_SIZE": "2"}


def _overrides(folder: Path, out: Path, extra=()) -> list[str]:
    """helpers.prepare_tiny_folder's data (3 classes of 8x8 RGB, identity 'latents'), with a clf
    reference whose classifier rank 0 trains for 20 steps after the shards: the window rank 1 must wait."""
    return folder_overrides(
        folder,
        out,
        extra=["encode.batch_size=8", "data.reference.extractor=clf", "data.reference.classifier_steps=20", *extra],
    )


def _rank1(folder: Path, out: Path, log_dir: Path, cwd: Path, **env) -> subprocess.Popen:
    args = [*_overrides(folder, out), f"hydra.run.dir={log_dir}"]
    return subprocess.Popen(
        [sys.executable, "-m", "ditlab.prepare", *args],
        cwd=cwd,
        env=cli_env(RANK="1", LOCAL_RANK="1", **RANKS, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rank0(folder: Path, out: Path, tmp_path: Path, monkeypatch, extra=()):
    """Rank 0's ``ditlab.prepare`` in this process: a function that runs it."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", **RANKS}.items():
        monkeypatch.setenv(key, value)
    cfg = compose_cfg("prepare", _overrides(folder, out, extra))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return lambda: prepare_from_config(cfg)


def _items(prepared: Path, split: str) -> list[tuple[bytes, int]]:
    from litdata import StreamingDataset

    data = StreamingDataset(str(prepared / split))
    return sorted((np.asarray(data[i]["latent"]).tobytes(), int(data[i]["label"])) for i in range(len(data)))


def test_two_ranks_meet_through_the_prepared_dir(prepared, tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "images", per_class=16, size=(8, 8), corrupt=False)
    out = tmp_path / "latents"

    # rank 1 dies after its first batch; rank 0 encodes its share and waits for rank 1's shards, in
    # vain: after encode.wait_s one error, and no meta.json (the dir is not prepared)
    rank1 = _rank1(folder, out, tmp_path / "log1", tmp_path, DITLAB_FAULT="prepare_batch@1:kill")
    assert rank1.wait(timeout=120) == -signal.SIGKILL, rank1.stderr.read()[-3000:]
    with pytest.raises(WaitTimeout, match="waited 2 s for every rank's"):
        _rank0(folder, out, tmp_path, monkeypatch, ["encode.wait_s=2"])()
    assert (out / "train.tmp" / "0.index.json").exists()  # rank 0's share was written
    assert not (out / "meta.json").exists() and not (out / "train").exists()

    # the rerun resumes; rank 1 returns only once rank 0 has written meta.json (rank 0 trains the
    # classifier for its reference statistics first: a rank 1 that did not wait would be gone before)
    rank1 = _rank1(folder, out, tmp_path / "log1b", tmp_path)
    rank0_done: list = []
    run_rank0 = _rank0(folder, out, tmp_path, monkeypatch)
    rank0 = threading.Thread(target=lambda: rank0_done.append(_result_or_error(run_rank0)))
    rank0.start()
    _, err1 = rank1.communicate(timeout=300)
    assert rank1.returncode == 0, err1[-3000:]
    assert (out / "meta.json").is_file() and (out / "reference_clf.npz").is_file()
    rank0.join(timeout=300)
    assert rank0_done and not isinstance(rank0_done[0], BaseException), rank0_done
    for key in ("RANK", "LOCAL_RANK", *RANKS):  # this process reads the result as a single process
        monkeypatch.delenv(key)

    # one consistent output: the counts and the items one process prepares from the same images
    ours, single = read_meta(out), read_meta(prepared)
    assert ours["splits"] == single["splits"] and ours["classes"] == single["classes"]
    for split in ("train", "val"):
        assert _items(out, split) == _items(prepared, split)
    assert not list(out.glob("*.tmp")) and not (out / ".rank_counts").exists()


def _result_or_error(run):
    try:
        return run()
    except BaseException as err:  # noqa: BLE001 - handed to the test's thread, which fails on it
        return err
