"""Skipping steps whose gradients are not finite, and stopping a run that keeps producing them.

A NaN/Inf in the loss shows up in the gradients (backward propagates it), and the gradients are
the same on every rank after DDP's all-reduce, so the decision is taken on the gradient norm: every
rank skips the same steps. A skipped step changes nothing: no optimizer update (all grads are
dropped, so AdamW touches neither weights nor moments), no EMA update. The step counter still
advances (the batch was consumed), and so does the LR schedule. After ``max_consecutive`` skipped
steps in a row the run stops with ``NonFiniteTraining``; the checkpoints on disk hold the weights
from before the streak (skipped steps do not change them).

With a fused optimizer (AdamW ``fused=True``, the default on CUDA and on the CPU) nothing leaves
the device: the non-finite flag goes to the optimizer as ``found_inf`` (its kernel skips the
update, as under GradScaler), masks the EMA step, and the counters stay on the device until a
logging step reads them, so a streak stops the run at the first logging step after K skips in a
row. With other optimizers the decision costs one host sync per optimizer step (a scalar
``isfinite``). ``max_consecutive=0`` turns the guard off (no check, no sync).
"""

from __future__ import annotations

import torch


def skips_on_device(optimizer) -> bool:
    """Whether the optimizer can skip a step on the device from a ``found_inf`` flag (fused Adam/AdamW).
    Asked of the parameter groups, not ``defaults``: a resumed optimizer takes its groups (and their
    ``fused``) from the checkpoint, and a non-fused step refuses ``found_inf``."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        group.get("fused") for group in optimizer.param_groups
    )


class NonFiniteTraining(RuntimeError):
    """Too many non-finite steps in a row: the run cannot recover by itself."""


class NonFiniteSteps:
    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 0:
            raise ValueError(f"module.max_nonfinite_steps={max_consecutive}; expected an integer >= 0 (0: off)")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # in the whole run (restored from the checkpoint)
        self.consecutive = 0
        self.skip_this_step = False
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None  # (skipped, consecutive) of the device path

    def check(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | None) -> bool:
        """Decide (one host sync) whether this step is skipped; True when it is. A NaN/Inf loss makes
        NaN gradients (backward propagates it), so the norm sees it."""
        if self.max_consecutive == 0:
            return False
        # The gradient norm when there are gradients: identical on every rank after the all-reduce
        # (a rank's own loss is not, and ranks that disagree about skipping would drift apart).
        value = grad_norm if grad_norm is not None else loss
        ok = True if value is None else bool(torch.isfinite(value.detach().float()).all())
        self.skip_this_step = not ok
        return self.skip_this_step

    def end_step(self, step: int) -> bool:
        """After the optimizer step: True when it was a real update (then the EMA may follow)."""
        if not self.skip_this_step:
            self.consecutive = 0
            return True
        self.skip_this_step = False
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTraining(
                f"non-finite loss or gradients in {self.consecutive} consecutive steps (the last at step {step}, "
                f"{self.skipped} skipped in all); expected finite values: lower optim.optimizer.lr, "
                "check the data, or raise module.max_nonfinite_steps"
            )
        return False

    # ---------------------------------------------------------------- the device path (fused optimizers)
    def flag(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """0-dim float on the device, 1. when this step's gradient norm is not finite: the fused
        optimizer's ``found_inf``. The counters are updated on the device; no host sync."""
        found = (~torch.isfinite(grad_norm.detach().float())).float().reshape(())
        if self._on_device is None:
            self._on_device = (
                torch.tensor(float(self.skipped), device=found.device),
                torch.tensor(float(self.consecutive), device=found.device),
            )
        skipped, consecutive = self._on_device
        skipped.add_(found)
        consecutive.add_(found).mul_(found)  # + 1 while skipping, back to 0 on a real update
        return found

    @property
    def skipped_on_device(self) -> torch.Tensor | None:
        return None if self._on_device is None else self._on_device[0]

    def sync(self, step: int) -> None:
        """Read the device counters (a host sync: logging steps and checkpoints only); raise after K in a row."""
        if self._on_device is None:
            return
        self.skipped, self.consecutive = (int(v.item()) for v in self._on_device)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteTraining(
                f"non-finite loss or gradients in {self.consecutive} consecutive steps (the last by step {step}, "
                f"{self.skipped} skipped in all); expected finite values: lower optim.optimizer.lr, "
                "check the data, or raise module.max_nonfinite_steps"
            )

    def state_dict(self) -> dict:
        if self._on_device is not None:
            self.skipped, self.consecutive = (int(v.item()) for v in self._on_device)
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state.get("skipped", 0)), int(state.get("consecutive", 0))
        self._on_device = None  # re-created from these on the next step
