"""Preemption: SIGTERM / SIGUSR1 (what SLURM and most schedulers send before they kill a job)
become "checkpoint at the next step boundary, then stop with a non-zero status".

Lightning's own SIGTERM handling stops the loop and exits with status 0 and no checkpoint, so a
job script sees success and loses every step since the last periodic checkpoint. This callback
installs its own handlers when training starts: the handler only sets a flag; at the end of an
optimizer step (after the EMA update, before the periodic checkpoint callback) the ranks agree on
the flag, ``last.ckpt`` is written (atomically), an earlier handler of that signal (e.g.
submitit's requeue under ``hydra/launcher=slurm``) is called, ``scontrol requeue`` runs when
``requeue`` is set under SLURM, and ``Preempted`` is raised: ``ditlab.train`` prints one line with
"preempted" and exits with status ``PREEMPTED_EXIT``. Rerun with ``ckpt_path=last`` (the
experiment configs do) to continue exactly.

With several processes the agreement is a collective, so it is held on the steps every rank knows
in advance: every ``check_every_n_steps`` (default ``trainer.log_every_n_steps``, when the logged
values are reduced anyway) and at the last step; the other steps run no collective but the
gradients' (Lightning's own per-step SIGTERM broadcast is switched off while this callback owns the
signals). Every rank stops after the same step; a signal waits at most that many steps.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

from lightning import Callback

log = logging.getLogger("ditlab.train")
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"


class Preempted(Exception):
    """Stopped by a signal after writing a checkpoint; ``ckpt_path=last`` continues the run."""


class Preemption(Callback):
    """Args:
    signals: names of the signals that mean "checkpoint and stop" (SIGTERM, SIGUSR1, ...).
    requeue: under SLURM (SLURM_JOB_ID set, not submitit), run ``scontrol requeue`` after the checkpoint.
    check_every_n_steps: with several processes, agree on the flag every N optimizer steps (and at the
        last step); None: every ``trainer.log_every_n_steps``. One process checks every step.
    """

    def __init__(self, signals=("SIGTERM", "SIGUSR1"), requeue: bool = False, check_every_n_steps: int | None = None):
        unknown = [s for s in signals if not isinstance(getattr(signal, str(s), None), signal.Signals)]
        if unknown:
            raise ValueError(f"callbacks.preemption.signals has {unknown[0]!r}; expected names such as SIGTERM")
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"callbacks.preemption.check_every_n_steps={check_every_n_steps}; expected >= 1 or null")
        self.signals = [getattr(signal, s) for s in signals]
        self.requeue = requeue
        self.check_every_n_steps = check_every_n_steps
        self.received: int | None = None
        # The handlers before the trainer's (e.g. submitit's requeue), to hand over to after the checkpoint.
        self._before = {s: signal.getsignal(s) for s in self.signals}
        self._during: dict = {}

    # ------------------------------------------------------------ signals
    def _handler(self, signum, frame) -> None:
        if self.received is None:
            log.info(f"received {signal.Signals(signum).name}: checkpoint at the end of this step, then stop")
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        self.received = None
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:  # arrived during set-up, to Lightning's handler
            connector.received_sigterm = False  # else Lightning ends the loop itself: exit 0, no checkpoint
            self.received = signal.SIGTERM
        for s in self.signals:
            self._during[s] = signal.getsignal(s)
            signal.signal(s, self._handler)
        if any(s == signal.SIGTERM for s in self.signals):
            _skip_lightnings_sigterm_broadcast(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for s, handler in self._during.items():
            signal.signal(s, handler)
        self._during = {}

    # ------------------------------------------------------------ step boundary
    def agrees_now(self, trainer) -> bool:
        """Whether the ranks agree on the flag after this optimizer step (the same answer on every rank)."""
        every = self.check_every_n_steps or max(trainer.log_every_n_steps, 1)
        step = trainer.global_step
        last = trainer.max_steps is not None and trainer.max_steps > 0 and step >= trainer.max_steps
        return step % every == 0 or last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:  # every rank must agree: saving is collective
            if not self.agrees_now(trainer):
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or Path(trainer.default_root_dir, "checkpoints")
        path = Path(dirpath) / "last.ckpt"
        _record_as_last_checkpoint(trainer.checkpoint_callback, path)
        trainer.save_checkpoint(path)
        message = (
            f"preempted by {name} at step {trainer.global_step}; checkpoint {path} written; "
            "rerun with ckpt_path=last in the same run dir to continue"
        )
        if trainer.is_global_zero:
            log.info(message)  # also in the log: a handler handed over to below (submitit's) may exit right away
            self._hand_over()
        raise Preempted(message)

    def _hand_over(self) -> None:
        previous = self._before.get(self.received)
        if callable(previous):  # e.g. submitit's handler: requeues the job (and may exit)
            previous(self.received, None)
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            status = subprocess.call(["scontrol", "requeue", job])
            log.info(f"scontrol requeue {job}: {'ok' if status == 0 else f'failed ({status})'}")


def _record_as_last_checkpoint(callback, path: Path) -> None:
    """Make ``path`` the checkpoint callback's own last.ckpt (its state is saved in the checkpoint):
    the resumed run then overwrites it. Otherwise, when the signal comes before the callback's first
    save, Lightning's version counter leaves last.ckpt at the preempted step and goes on in last-v1.ckpt."""
    if callback is not None and hasattr(callback, "last_model_path"):
        callback.last_model_path = str(path)


def _skip_lightnings_sigterm_broadcast(trainer) -> None:
    """Lightning (2.5+) broadcasts a SIGTERM flag from rank 0 before every training batch of a
    multi-process run: a collective and a host sync per step. Here the flag is always false (the
    handlers above take SIGTERM from Lightning's), so the broadcast goes for the run."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        epoch_loop._broadcast_sigterm_tensor = lambda: None
