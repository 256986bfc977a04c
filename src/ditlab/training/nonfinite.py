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

A step asks the guard twice: ``before_optimizer_step`` (with the gradient norm) decides, and
``after_optimizer_step`` says how the EMA may follow (``EMAStep``); what lies between the two calls
is the guard's own state.
"""

from __future__ import annotations

from typing import NamedTuple

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


class EMAStep(NamedTuple):
    """How the EMA follows an optimizer step: not at all, fully, or masked by a device flag."""

    update: bool
    keep: torch.Tensor | None = None  # 0-dim 0./1. on the device: the step's update was kept


class NonFiniteSteps:
    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 0:
            raise ValueError(f"module.max_nonfinite_steps={max_consecutive}; expected an integer >= 0 (0: off)")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # in the whole run (restored from the checkpoint)
        self.consecutive = 0
        self._skip = False  # the host path's decision for the step under way
        self._keep: torch.Tensor | None = None  # the device path's mask for the step under way
        self._read_counters = False  # the device path: read the counters after this step (a logging step)
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None  # (skipped, consecutive)

    @property
    def enabled(self) -> bool:
        return self.max_consecutive > 0

    def before_optimizer_step(self, optimizer, grad_norm: torch.Tensor | None, logging: bool) -> None:
        """Decide about the step under way from its gradient norm (identical on every rank after the
        all-reduce; a rank's own loss is not, and ranks that disagree about skipping drift apart).
        ``optimizer`` is the torch optimizer: a fused one gets ``found_inf``, another has its
        gradients dropped when the step is skipped (one host sync)."""
        self._skip, self._keep, self._read_counters = False, None, logging
        if not self.enabled or grad_norm is None:
            return
        if skips_on_device(optimizer):
            optimizer.found_inf = self._flag(grad_norm)
            self._keep = 1.0 - optimizer.found_inf
        elif not bool(torch.isfinite(grad_norm.detach().float()).all()):
            self._skip = True
            optimizer.zero_grad(set_to_none=True)  # the optimizer then updates nothing

    def after_optimizer_step(self, step: int) -> EMAStep:
        """After the optimizer step: count it, stop a streak (``NonFiniteTraining``), and say how the
        EMA may follow."""
        if self._keep is not None:
            if self._read_counters:
                self.sync(step)
            return EMAStep(True, self._keep)
        if not self._skip:
            self.consecutive = 0
            return EMAStep(True)
        self.skipped += 1
        self.consecutive += 1
        self._raise_on_streak(step)
        return EMAStep(False)

    def skipped_so_far(self) -> torch.Tensor | float:
        """Skipped steps in the run, for the logs: a device tensor on the device path (no sync)."""
        if self._on_device is not None:
            return self._on_device[0]
        return float(self.skipped + self._skip)

    # ---------------------------------------------------------------- the device path (fused optimizers)
    def _flag(self, grad_norm: torch.Tensor) -> torch.Tensor:
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
