"""A resumed run equals the uninterrupted one exactly (weights, EMA, optimizer), and the random
streams of a step are independent of each other."""

from __future__ import annotations

import itertools

import torch
from reliability_runs import STEPS, assert_same_state, compose, train_in_process

from ditlab.seeding import TRAIN_STREAMS, stream_generator, stream_seed


def test_streams_never_share_a_seed():
    """Every (stream, rank, step, micro-batch) of a small grid gets its own seed: no two streams
    coincide, neither at the same point (the old scheme seeded data and noise alike at micro-batch
    0) nor shifted by one step or rank."""
    names = (*TRAIN_STREAMS, "val_timesteps", "val_diffusion_noise", "data_val", "sample_init", "sampler")
    points = list(itertools.product(range(3), range(50), range(2)))  # rank, step, micro-batch
    seeds = [stream_seed(0, name, *p) for name in names for p in points]
    assert len(set(seeds)) == len(seeds)


def test_streams_draw_unrelated_numbers():
    at = (0, 7, 0)
    draws = {name: torch.randn(4096, generator=stream_generator("cpu", 0, name, *at)) for name in TRAIN_STREAMS}
    for a, b in itertools.combinations(TRAIN_STREAMS, 2):
        corr = torch.corrcoef(torch.stack([draws[a], draws[b]]))[0, 1]
        assert abs(float(corr)) < 0.1, (a, b, float(corr))
    again = torch.randn(4096, generator=stream_generator("cpu", 0, "diffusion_noise", *at))
    assert torch.equal(again, draws["diffusion_noise"])  # and each stream is reproducible


def test_stop_and_resume_equals_uninterrupted_with_fast_ema(prepared, reference, tmp_path):
    """decay 0.5 and lr 1e-2: an EMA one update behind (the old off-by-one) or a redrawn stream shows."""
    out = tmp_path / "run"
    train_in_process(compose(prepared, out, steps=STEPS // 2))
    train_in_process(compose(prepared, out, steps=STEPS))  # ckpt_path=last
    assert_same_state(out / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    ema_updates = [v for k, v in ckpt["state_dict"].items() if k.endswith("num_updates")]
    assert not ema_updates or int(ema_updates[0]) == STEPS
