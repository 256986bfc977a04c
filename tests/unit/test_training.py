"""The parts of a training step that are plain objects: the EMA, the lr schedules, the non-finite guard."""

import pytest
import torch

from ditlab.training.ema import EMA


def test_ema_warmup_decay_survives_a_state_dict_round_trip():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.999, warmup=True)
    for _ in range(5):
        ema.update(net)
    restored = EMA(net, decay=0.999, warmup=True)
    restored.load_state_dict(ema.state_dict())
    assert restored.current_decay() == ema.current_decay() == 6 / 15
    frozen = torch.nn.Linear(2, 2)
    frozen.bias.requires_grad_(False)
    ema2 = EMA(frozen, decay=0.5)
    with torch.no_grad():
        frozen.weight.add_(2.0)
        frozen.bias.add_(2.0)
    ema2.update(frozen)
    # trainable parameters are averaged, frozen ones copied
    assert torch.allclose(ema2.net.weight, frozen.weight - 1.0) and torch.equal(ema2.net.bias, frozen.bias)


def test_ema_follows_a_network_whose_tensors_were_replaced():
    """update() lists the tensors once; a load with assign=True puts new ones in the modules, and the
    average must follow those, not the old ones it listed."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    ema = EMA(net, decay=0.5)
    ema.update(net)  # lists the pairs
    replacement = {k: torch.full_like(v, 3.0) for k, v in net.state_dict().items()}
    net.load_state_dict(replacement, assign=True)
    before = {k: v.clone() for k, v in ema.net.state_dict().items()}
    ema.update(net)
    for k, v in ema.net.state_dict().items():
        assert torch.allclose(v, 0.5 * before[k] + 0.5 * 3.0), k
    with pytest.raises(ValueError, match="EMA of a different network"):
        ema.update(torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)}))
    with pytest.raises(ValueError, match="EMA of a different network"):  # one more layer than averaged
        ema.update(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))


def test_the_lr_rules_are_the_formulas_the_loops_were_written_with():
    """warmup_cosine_factor is the classifier's old schedule bit for bit, warmup_factor the small VAE's."""
    import math

    from ditlab.training.schedules import warmup_cosine_factor, warmup_factor

    max_steps, warmup = 1200, 100
    for s in (0, 1, 50, 99, 100, 101, 600, 1199, 1200, 5000):
        old = min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, max_steps))))
        assert warmup_cosine_factor(s, max_steps, warmup) == old
        assert warmup_factor(s, 100) == min(1.0, (s + 1) / 100)
    assert warmup_factor(0, 0) == 1.0 and warmup_cosine_factor(2000, 1000, 0, min_ratio=0.1) == pytest.approx(0.1)


def test_nonfinite_guard_skips_and_raises_only_after_k_in_a_row():
    from ditlab.training.nonfinite import NonFiniteSteps, NonFiniteTraining

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    guard = NonFiniteSteps(max_consecutive=2)
    nan, inf, one = torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(1.0)
    for norm, updated in [(one, True), (nan, False), (one, True), (inf, False), (None, True)]:
        p.grad = torch.ones(2)
        assert guard.decide(opt, norm) is updated
        assert (p.grad is not None) is updated  # a skipped step has its gradients dropped
        guard.stop_on_streak(0, read=False)
    guard.decide(opt, nan)
    guard.stop_on_streak(4, read=False)
    guard.decide(opt, nan)
    with pytest.raises(NonFiniteTraining, match="2 consecutive steps .the last by step 5, 4 skipped in all"):
        guard.stop_on_streak(5, read=False)
    off = NonFiniteSteps(max_consecutive=0)  # off: no check (and no host sync)
    p.grad = torch.ones(2)
    assert off.decide(opt, nan) is True and p.grad is not None
    off.stop_on_streak(1, read=True)


def test_nonfinite_guard_on_the_device_masks_the_step_without_a_sync():
    from ditlab.training.nonfinite import NonFiniteSteps, NonFiniteTraining

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], fused=True)
    guard = NonFiniteSteps(max_consecutive=2)
    keep = guard.decide(opt, torch.tensor(float("nan")))
    guard.stop_on_streak(1, read=False)
    assert float(keep) == 0.0 and float(opt.found_inf) == 1.0  # the kernel skips
    assert guard.skipped == 0 and float(guard.skipped_so_far()) == 1.0  # counted on the device, not read
    guard.decide(opt, torch.tensor(float("inf")))
    with pytest.raises(NonFiniteTraining, match="2 consecutive"):  # read on a logging step
        guard.stop_on_streak(2, read=True)


def test_a_skipped_step_leaves_the_ema_alone_and_a_device_mask_masks_it():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.add_(2.0)
    before = ema.net.weight.clone()
    ema.update(net, keep=False)  # the host path's skipped step: no update, not counted
    assert torch.equal(ema.net.weight, before) and int(ema.num_updates) == 0
    ema.update(net, keep=torch.tensor(0.0))  # the device path's skipped step: masked, counted on the host only
    assert torch.equal(ema.net.weight, before) and int(ema.num_updates) == 0
    ema.update(net, keep=torch.tensor(1.0))
    assert torch.allclose(ema.net.weight, 0.5 * before + 0.5 * net.weight) and int(ema.num_updates) == 1
