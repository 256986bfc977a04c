"""When a training-time action is due (the module and the callbacks ask the same question).

One training batch is one optimizer step (with gradient accumulation the batch holds the step's
micro-batches: ``DiTModule.training_step``), so the answers count optimizer steps, from the public
``trainer.global_step``.
"""

from __future__ import annotations


def at_optimizer_step(trainer, every_n_steps: int) -> bool:
    """After a step (in ``on_train_batch_end``): True when its number is a positive multiple of ``every_n_steps``."""
    step = trainer.global_step
    return every_n_steps > 0 and step > 0 and step % every_n_steps == 0


def logs_at(trainer, step: int) -> bool:
    """Whether the loggers write the values logged at optimizer step ``step`` (1-based): Lightning's
    rule, every ``trainer.log_every_n_steps`` steps and when the trainer is stopping; the same on
    every rank."""
    every = trainer.log_every_n_steps
    return every > 0 and (step % every == 0 or trainer.should_stop)


def on_progress_bar(pl_module) -> bool:
    """Whether a logged value may also go to the progress bar. Lightning reads every progress-bar
    value with ``.item()`` after every batch, logged this step or not: on a GPU that is a host sync
    per step, so there the values go to the loggers only."""
    return pl_module.device.type != "cuda"
