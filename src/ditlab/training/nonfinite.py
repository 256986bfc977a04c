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

The training step asks twice: ``keep = guard.decide(optimizer, grad_norm)`` before
``optimizer.step()`` (counts the step, drops its gradients or arms ``found_inf``) and
``guard.stop_on_streak(step, read)`` after it. ``keep`` is what the EMA update is told: True,
False, or a 0-dim 0./1. tensor on the device.
"""

from __future__ import annotations

import torch

Keep = bool | torch.Tensor  # an update kept (True), skipped (False), or a 0-dim 0./1. mask on the device


def skips_on_device(optimizer) -> bool:
    """Whether the optimizer can skip a step on the device from a ``found_inf`` flag (fused Adam/AdamW).
    Asked of the parameter groups, not ``defaults``: a resumed optimizer takes its groups (and their
    ``fused``) from the checkpoint, and a non-fused step refuses ``found_inf``."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def not_finite(grad_norm: torch.Tensor) -> torch.Tensor:
    """0-dim float on the device: 1. when the gradient norm is not finite (the fused ``found_inf``)."""
    return (~torch.isfinite(grad_norm.detach().float())).float().reshape(())


class NonFiniteTraining(RuntimeError):
    """Too many non-finite steps in a row: the run cannot recover by itself."""


class NonFiniteSteps:
    """The run's count of skipped steps (in the checkpoint) and the decision for each step."""

    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 0:
            raise ValueError(f"module.max_nonfinite_steps={max_consecutive}; expected an integer >= 0 (0: off)")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # in the whole run (restored from the checkpoint)
        self.consecutive = 0
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None  # (skipped, consecutive): fused path

    @property
    def enabled(self) -> bool:
        return self.max_consecutive > 0

    def decide(self, optimizer, grad_norm: torch.Tensor | None) -> Keep:
        """Before ``optimizer.step()``: whether this step's update is kept, from its gradient norm
        (identical on every rank after the all-reduce; a rank's own loss is not, and ranks that
        disagree about skipping drift apart), counted. ``optimizer`` is the torch optimizer: a fused
        one gets ``found_inf`` (the answer is then a device mask, counted on the device), another
        has its gradients dropped when the step is skipped (one host sync)."""
        if not self.enabled or grad_norm is None:
            self.consecutive = 0
            return True
        if skips_on_device(optimizer):
            found = not_finite(grad_norm)
            optimizer.found_inf = found
            if self._on_device is None:
                self._on_device = (
                    torch.tensor(float(self.skipped), device=found.device),
                    torch.tensor(float(self.consecutive), device=found.device),
                )
            skipped, consecutive = self._on_device
            skipped.add_(found)
            consecutive.add_(found).mul_(found)  # + 1 while skipping, back to 0 on a real update
            return 1.0 - found
        if bool(torch.isfinite(grad_norm.detach().float()).all()):
            self.consecutive = 0
            return True
        optimizer.zero_grad(set_to_none=True)  # the optimizer then updates nothing
        self.skipped += 1
        self.consecutive += 1
        return False

    def stop_on_streak(self, step: int, read: bool) -> None:
        """After ``optimizer.step()``: raise ``NonFiniteTraining`` when the skipped steps in a row
        reached ``max_consecutive``. The device counts are read (a host sync) only when ``read``
        (logging steps)."""
        if self._on_device is None:
            self._raise_on_streak(step)
        elif read:
            self.sync(step)

    def skipped_so_far(self) -> torch.Tensor | float:
        """Skipped steps in the run, for the logs: a device tensor on the device path (no sync)."""
        return self._on_device[0] if self._on_device is not None else float(self.skipped)

    def sync(self, step: int) -> None:
        """Read the device counters (a host sync: logging steps and checkpoints only); raise after K in a row."""
        if self._on_device is None:
            return
        self.skipped, self.consecutive = (int(v.item()) for v in self._on_device)
        self._raise_on_streak(step)

    def _raise_on_streak(self, step: int) -> None:
        if self.enabled and self.consecutive >= self.max_consecutive:
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
