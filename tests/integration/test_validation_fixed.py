"""The fixed-timestep validation loss through Lightning's validation loop: the same number at every
validation of the same weights, another when the weights change, and the same in a run of another
seed (its latents, times and noise do not depend on the run)."""

import lightning as L
import pytest
import torch

from ditlab.train import build
from ditlab.training.validation import fixed_loss_names
from helpers import compose_run


def validate(module, datamodule) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {name: value for name, value in metrics.items() if name.startswith("val/loss_fixed")}


OBJECTIVES = {"ddpm": ["diffusion=ddpm"], "flow": ["diffusion=flow", "sampler=flow_euler50"]}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fixed_loss_is_the_same_for_the_same_weights_in_any_run_and_moves_with_the_weights(
    prepared, tmp_path, objective
):
    datamodule, module = build(compose_run(prepared, tmp_path / "a", extra=OBJECTIVES[objective]))
    first = validate(module, datamodule)
    grid = module.val_grid
    assert list(first) == ["val/loss_fixed", *fixed_loss_names(grid)] and len(grid) == 5
    assert first["val/loss_fixed"] == pytest.approx(sum(first[n] for n in fixed_loss_names(grid)) / len(grid))
    assert len({round(first[n], 6) for n in fixed_loss_names(grid)}) == len(grid)  # each time its own loss
    assert validate(module, datamodule) == first  # exactly: nothing is drawn anew

    with torch.no_grad():  # validation measures the EMA weights
        module.ema.net.final_layer.linear.bias.add_(0.05)
    moved = validate(module, datamodule)
    assert all(moved[name] != first[name] for name in first)

    # another run, of another seed (its data module's too), holding the same weights: the same number
    other_data, other = build(compose_run(prepared, tmp_path / "b", extra=[*OBJECTIVES[objective], "seed=1"]))
    assert not torch.equal(other.ema.net.final_layer.linear.bias, module.ema.net.final_layer.linear.bias)
    other.load_state_dict(module.state_dict())
    assert validate(other, other_data) == moved
