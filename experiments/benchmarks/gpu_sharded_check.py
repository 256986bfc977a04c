"""End-to-end check of the sharded and the default GPU paths on a tiny prepared folder (issue 12).

    PYTHONPATH=src:tests python experiments/benchmarks/gpu_sharded_check.py [extra ditlab.train overrides]

On a GPU, with no extra overrides: `trainer=fsdp trainer.devices=1` (FSDP2, bf16, compiled blocks,
activation checkpointing) trains 3 steps, writes a sample grid and an FID of the EMA weights,
checkpoints, resumes to 5 steps; the checkpoint samples in `ditlab.sample` and exports to diffusers;
then `trainer=gpu` (the default single-GPU path) does the same 3 steps. Each stage prints PASS or
FAIL with the reason. On the CPU pass `trainer.accelerator=cpu trainer.precision=32-true` to try it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers import prepare_tiny_folder, tiny_overrides


def train(prepared, root, run_name, steps, extra):
    args = tiny_overrides(
        prepared,
        root,
        steps=steps,
        extra=[
            f"run_name={run_name}",
            "fid_protocol.extractor=clf",
            "fid_protocol.num_samples=6",
            "fid_protocol.batch_size=4",
            "+fid_protocol.sampler._target_=ditlab.diffusion.Sampler",
            "+fid_protocol.sampler.name=dpmpp_2m",
            "+fid_protocol.sampler.steps=3",
            *extra,
        ],
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ditlab.train", *args], cwd=root, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    run = root / "outputs" / "train" / run_name
    return result, run, seconds


def _tail(result):
    return "" if result.returncode == 0 else "\n" + result.stderr[-3000:]


def report(stage, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {stage} {detail}", flush=True)
    return ok


def main(extra):
    import torch

    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    prepared = prepare_tiny_folder(root / "data", reference="clf")
    sharded = ["trainer=fsdp", "trainer.devices=1", "module.activation_checkpointing=1", *extra]
    result, run, seconds = train(prepared, root, "fsdp", 3, sharded)
    if not report("fsdp train 3 steps", result.returncode == 0, f"{seconds:.0f} s {_tail(result)}"):
        return 1
    first_line = next((ln for ln in result.stderr.splitlines() + result.stdout.splitlines() if "hardware" in ln), "")
    print("  ", first_line)
    metrics = json.loads((run / "metrics.json").read_text())
    report("grid written", (run / "samples" / "step_0000003.png").is_file())
    report("FID of the EMA weights", metrics["metrics"].get("val/fid_clf", 0) > 0, str(metrics["metrics"]))
    result, run, seconds = train(prepared, root, "fsdp", 5, [*sharded, "ckpt_path=last"])
    if not report("fsdp resume to 5", result.returncode == 0, f"{seconds:.0f} s {_tail(result)}"):
        return 1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    report("resumed checkpoint at step 5", ckpt["global_step"] == 5, str(ckpt["global_step"]))
    out = root / "sampled"
    result = subprocess.run(
        [sys.executable, "-m", "ditlab.sample", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "num_samples=2",
         "sampler=ddim50", "steps=2", f"out={out}"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    report("ditlab.sample on the sharded checkpoint", (out / "samples_2x8x8x3.npz").is_file(), _tail(result))
    try:
        from ditlab.pipelines.export import export_transformer

        export_transformer(run / "checkpoints" / "last.ckpt", root / "diffusers")
        report("diffusers export", (root / "diffusers").is_dir())
    except Exception as error:  # noqa: BLE001 - reported, the other stages still run
        report("diffusers export", False, repr(error))
    result, run, seconds = train(prepared, root, "gpu", 3, ["trainer=gpu", *extra])
    ok = result.returncode == 0 and (run / "samples" / "step_0000003.png").is_file()
    report("trainer=gpu train 3 steps + grid + FID", ok, f"{seconds:.0f} s {_tail(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
