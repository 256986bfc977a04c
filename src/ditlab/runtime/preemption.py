"""Preemption: SIGTERM / SIGUSR1 (what SLURM and most schedulers send before they kill a job)
become "checkpoint at the next step boundary, then stop with a non-zero status".

Lightning's own SIGTERM handling stops the loop and exits with status 0 and no checkpoint, so a
job script sees success and loses every step since the last periodic checkpoint. This callback
installs its own handlers when training starts: the handler only sets a flag; at the end of the
next optimizer step (after the EMA update, before the periodic checkpoint callback) every rank
agrees on the flag, ``last.ckpt`` is written (atomically), an earlier handler of that signal (e.g.
submitit's requeue under ``hydra/launcher=slurm``) is called, ``scontrol requeue`` runs when
``requeue`` is set under SLURM, and ``Preempted`` is raised: ``ditlab.train`` prints one line with
"preempted" and exits with status ``PREEMPTED_EXIT``. Rerun with ``ckpt_path=last`` (the
experiment configs do) to continue exactly.
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
    """

    def __init__(self, signals=("SIGTERM", "SIGUSR1"), requeue: bool = False):
        unknown = [s for s in signals if not isinstance(getattr(signal, str(s), None), signal.Signals)]
        if unknown:
            raise ValueError(f"callbacks.preemption.signals has {unknown[0]!r}; expected names such as SIGTERM")
        self.signals = [getattr(signal, s) for s in signals]
        self.requeue = requeue
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

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for s, handler in self._during.items():
            signal.signal(s, handler)
        self._during = {}

    # ------------------------------------------------------------ step boundary
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():
            return  # mid-step: the boundary is the micro-batch that completes the optimizer step
        stop = self.received is not None
        if trainer.world_size > 1:  # every rank must agree: saving is collective
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or Path(trainer.default_root_dir, "checkpoints")
        path = Path(dirpath) / "last.ckpt"
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
