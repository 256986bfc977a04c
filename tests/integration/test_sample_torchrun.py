"""FID-50K across processes: ``torchrun -m ditlab.sample`` on 2 CPU processes writes the same .npz as
one process (same seeds, same images, compared exactly), merging only complete parts of its own
launch: a part left by an earlier run is never merged."""

import json
import subprocess
import sys

import numpy as np
import torch

from ditlab.sample import main as sample_main
from helpers import cli_env, invoke_main

SAMPLE_ARGS = ["num_samples=7", "batch_size=2", "sampler=ddim50", "steps=2", "guidance.scale=2.0", "seed=3"]


def test_two_processes_write_the_one_process_npz_and_skip_stale_parts(reference, tmp_path, monkeypatch, capsys):
    ckpt = reference / "checkpoints" / "last.ckpt"
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1): the same float reductions
    try:
        code, _, err = invoke_main(
            sample_main, "ditlab.sample", [f"ckpt={ckpt}", *SAMPLE_ARGS, f"out={one}"], monkeypatch, capsys
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err[-2000:]
    # an earlier launch into the same folder left parts behind (another launch id, and the old naming)
    two.mkdir()
    junk = np.full((4, 8, 8, 3), 255, np.uint8)
    np.savez(two / ".part-0123456789ab-1.npz", arr_0=junk, index=np.array([1, 3, 5, 7]))
    np.savez(two / ".part-1.npz", arr_0=junk[:3], index=np.array([1, 3, 5]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*launch, "-m", "ditlab.sample", f"ckpt={ckpt}", *SAMPLE_ARGS, f"out={two}"],
        cwd=tmp_path,
        env=cli_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name = "samples_7x8x8x3.npz"
    with np.load(one / name) as a, np.load(two / name) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
        assert (a["arr_0"] != 255).any()  # the stale parts' white images were not merged
    assert not list(two.glob(".part-*")) and not list(two.glob(".*.tmp-*"))  # merged, stale ones removed
    assert "a part of an earlier launch (not merged)" in result.stderr + result.stdout
    record_one = json.loads((one / "samples_7x8x8x3.json").read_text())
    record_two = json.loads((two / "samples_7x8x8x3.json").read_text())
    assert record_one["world_size"] == 1 and record_two["world_size"] == 2
    assert record_two["command"].startswith("torchrun --nproc_per_node=2 -m ditlab.sample ")
    for key in ("checkpoint", "sampler", "guidance", "num_samples", "seed", "labels", "batch_size"):
        assert record_one[key] == record_two[key], key
