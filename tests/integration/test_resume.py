"""A resumed run equals the uninterrupted one exactly (weights, EMA, optimizer, LR scheduler)."""

from __future__ import annotations

import torch

from helpers import STEPS, assert_same_state, compose_fault_run, train_in_process


def test_stop_and_resume_equals_uninterrupted_with_fast_ema(prepared, reference, tmp_path):
    """decay 0.5 and lr 1e-2: an EMA one update behind (the old off-by-one) or a redrawn stream shows."""
    out = tmp_path / "run"
    train_in_process(compose_fault_run(prepared, out, steps=STEPS // 2))
    train_in_process(compose_fault_run(prepared, out, steps=STEPS))  # ckpt_path=last
    assert_same_state(out / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    assert int(ckpt["state_dict"]["ema.num_updates"]) == STEPS  # every step's EMA update, none twice
