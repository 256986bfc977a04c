"""When a training-time action is due (the callbacks and the LightningModule ask the same question)."""

from __future__ import annotations


def at_optimizer_step(trainer, every_n_steps: int) -> bool:
    """True once per optimizer step whose number is a positive multiple of ``every_n_steps``
    (with gradient accumulation: only on the micro-batch that completes the step)."""
    step = trainer.global_step
    return every_n_steps > 0 and step > 0 and step % every_n_steps == 0 and not trainer.fit_loop._should_accumulate()


def logs_this_step(trainer) -> bool:
    """True on the steps whose logged values the loggers write (every ``log_every_n_steps``):
    Lightning's own rule, asked before the step runs, the same on every rank and micro-batch."""
    return trainer._logger_connector.should_update_logs


def on_progress_bar(pl_module) -> bool:
    """Whether a logged value may also go to the progress bar. Lightning reads every progress-bar
    value with ``.item()`` after every batch, logged this step or not: on a GPU that is a host sync
    per step, so there the values go to the loggers only."""
    return pl_module.device.type != "cuda"
