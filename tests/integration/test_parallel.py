"""Scale: sharded (FSDP2) training on the CPU with gloo, activation checkpointing, compiled blocks,
the hardware the default trainer picks, and the logging cadence."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ditlab.models.dit import DiT
from ditlab.models.weights import read_dit_weights
from ditlab.pipelines.export import export_transformer
from ditlab.training.parallel import checkpointed_blocks, parallelize
from helpers import randomised, tiny_overrides

TESTS = Path(__file__).resolve().parents[1]  # probes.py, the callbacks runs are given


def tiny_dit(**kw):
    torch.manual_seed(0)
    return randomised(DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, **kw))


def _grads(net, x, t, y):
    net.zero_grad(set_to_none=True)
    net(x, t, y).square().mean().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_plain_gradients_and_keeps_the_names(every):
    plain, ckpt = tiny_dit().train(), tiny_dit().train()
    parallelize(ckpt, activation_checkpointing=every)
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([1, 50, 300, 999]), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)  # label dropout draws: the same in both
    a = _grads(plain, x, t, y)
    torch.manual_seed(1)
    b = _grads(ckpt, x, t, y)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
    assert checkpointed_blocks(28, 0) == [] and checkpointed_blocks(6, 2) == [0, 2, 4]
    with pytest.raises(ValueError, match="activation_checkpointing=-1"):
        checkpointed_blocks(4, -1)


def test_compiled_blocks_equal_eager():
    eager, compiled = tiny_dit().eval(), tiny_dit().eval()
    parallelize(compiled, compile=True)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place: no _orig_mod.
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    try:
        out = compiled(x, t, y)
    except Exception as err:  # inductor needs a C++ compiler; say why instead of failing
        pytest.skip(f"torch.compile cannot compile on this machine: {str(err).splitlines()[0][:200]}")
    torch.testing.assert_close(out, eager(x, t, y), rtol=1e-4, atol=1e-5)


def test_bench_official_loss_is_ditlabs_hybrid_loss():
    """The benchmark's plain official step computes the same IDDPM hybrid loss as ditlab's objective."""
    from ditlab.bench.official import OfficialLoss
    from ditlab.diffusion import create_diffusion

    def model(x, t, y):  # any smooth function with a learned-variance output (N, 2C, H, W)
        return torch.cat([0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1) / 1000, torch.tanh(x)], dim=1)

    x0 = torch.rand(5, 3, 4, 4) * 2 - 1
    t, noise = torch.tensor([0, 1, 250, 600, 999]), torch.randn(5, 3, 4, 4)
    ours = create_diffusion(learn_sigma=True).training_losses(model, x0, t, {"y": None}, noise=noise)["loss"]
    torch.testing.assert_close(OfficialLoss()(model, x0, t, None, noise), ours, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- 2 processes, gloo
def run_two(prepared, root, run_name, strategy, steps, extra=()):
    # Activation checkpointing differs too (every block sharded, every other block under DDP): the
    # weights must agree all the same.
    strategy_args = (
        ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "module.activation_checkpointing=1"]
        if strategy == "fsdp"
        else ["trainer.strategy=ddp", "module.activation_checkpointing=2"]
    )
    args = tiny_overrides(
        prepared,
        root,
        steps=steps,
        extra=[
            *strategy_args,
            "trainer.devices=2",
            f"run_name={run_name}",
            "trainer.log_every_n_steps=2",
            "fid_protocol.extractor=clf",
            "fid_protocol.num_samples=6",
            "fid_protocol.batch_size=4",
            "+fid_protocol.sampler._target_=ditlab.diffusion.Sampler",
            "+fid_protocol.sampler.name=dpmpp_2m",
            "+fid_protocol.sampler.steps=3",
            "+callbacks.probe._target_=probes.LossProbe",
            f"+callbacks.probe.dir={root / 'outputs' / 'train' / run_name / 'probe'}",
            *extra,
        ],
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "ditlab.train", *args], cwd=root, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "outputs" / "train" / run_name


def _state(run):
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow  # five 2-process runs
def test_sharded_run_trains_samples_resumes_equals_ddp_and_loads_in_sample(prepared_clf, tmp_path):
    sharded = run_two(prepared_clf, tmp_path, "fsdp", "fsdp", steps=3)
    # trained, a grid and an FID of the EMA weights, with both ranks in the collectives
    assert (sharded / "samples" / "step_0000003.png").is_file()
    first = json.loads((sharded / "metrics.json").read_text())
    assert first["metrics"]["val/fid_clf"] > 0 and first["weights_used"]["FIDCallback"] == "ema"
    ckpt = _state(sharded)
    assert ckpt["global_step"] == 3 and not any("skeleton" in k for k in ckpt["state_dict"])
    # resumed sharded, from the full single-file checkpoint
    run_two(prepared_clf, tmp_path, "fsdp", "fsdp", steps=5, extra=["ckpt_path=last"])
    ddp = run_two(prepared_clf, tmp_path, "ddp", "ddp", steps=5)
    a, b = _state(sharded), _state(ddp)
    assert a["global_step"] == b["global_step"] == 5
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # weights and EMA (ema.net.*) after 3 + 2 sharded steps == 5 DDP steps
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-4, atol=1e-6, msg=key)
    assert a["state_dict"]["ema.num_updates"] == 5

    # logging cadence: only every log_every_n_steps=2 steps, and the logged loss is the mean over ranks and steps
    rows = list(csv.DictReader(open(ddp / "csv" / "run" / "metrics.csv")))
    logged = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    grad_norms = {int(r["step"]) for r in rows if r.get("train/grad_norm")}
    assert sorted(logged) == sorted(grad_norms) == [1, 3]
    per_rank = [
        {d["step"]: d["loss"] for d in map(json.loads, open(ddp / "probe" / f"loss_rank{r}.jsonl"))} for r in (0, 1)
    ]
    assert per_rank[0][1] != per_rank[1][1]  # the ranks saw different batches: the mean is not rank 0's
    # the logged value is the mean over both ranks and every step since the previous log (0-1, 2-3)
    for step, value in logged.items():
        window = [per_rank[r][s] for r in (0, 1) for s in (step - 1, step)]
        assert value == pytest.approx(sum(window) / len(window), rel=1e-5)
    # the sharded run logs the same loss and the same (full, gathered) gradient norm
    sharded_rows = list(csv.DictReader(open(sharded / "csv" / "run" / "metrics.csv")))
    first = next(r for r in sharded_rows if r.get("train/grad_norm"))
    assert int(first["step"]) == 1
    ddp_first = next(r for r in rows if r.get("train/grad_norm"))
    for key in ("train/loss", "train/grad_norm"):
        assert float(first[key]) == pytest.approx(float(ddp_first[key]), rel=1e-4), key

    # the sharded run's checkpoint samples on one device with ditlab.sample
    out = tmp_path / "sampled"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ditlab.sample",
            f"ckpt={sharded / 'checkpoints' / 'last.ckpt'}",
            "num_samples=2",
            "sampler=ddim50",
            "steps=2",
            f"out={out}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "samples_2x8x8x3.npz").is_file()
    assert OmegaConf.create(a["ditlab"]["config_yaml"]).trainer.strategy._target_.endswith("FSDP2Strategy")
    # ... and exports to diffusers with the full EMA weights
    exported = export_transformer(sharded / "checkpoints" / "last.ckpt", tmp_path / "diffusers")
    back = read_dit_weights(exported).state_dict
    ema = {k.removeprefix("ema.net."): v for k, v in a["state_dict"].items() if k.startswith("ema.net.")}
    for key in ema:
        torch.testing.assert_close(back[key], ema[key], msg=key)


def test_sampling_copies_are_plain_eval_modules_without_copying_unsharded_weights():
    from ditlab.training.ema import EMA

    net = tiny_dit().train()
    ema = EMA(net)
    assert ema.full_net() is ema.net and not any("skeleton" in k for k in ema.state_dict())
    raw = ema.materialize(net)  # the raw weights during training: eval mode (no label dropout), same storage
    assert not raw.training and net.training
    assert raw.blocks[0].mlp.fc1.weight.data_ptr() == net.blocks[0].mlp.fc1.weight.data_ptr()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    torch.testing.assert_close(raw(x, t, y), net.eval()(x, t, y))
