"""Fault injection for the reliability tests, in one place: a no-op unless ``DITLAB_FAULT`` is set.

Production code calls one hook, ``fault_point(point, target)``, where a fault can strike:
``ckpt_write`` (a checkpoint file being written: the file comes back wrapped and fails after its
first chunk, leaving a truncated temporary), ``ckpt_saved`` (right after a checkpoint file is
renamed into place: between ``step_N.ckpt`` and ``last.ckpt``), ``prepare_batch`` (after prepare
wrote a batch of latents). The training loop's own points come from ``FaultInjection``, a callback
the tests add (``+callbacks.faults._target_=ditlab.runtime.faults.FaultInjection``): ``batch`` (a
training batch, before its step) and ``step`` (the end of an optimizer step, after the run's own
callbacks: a signal sent there is seen at the next step boundary).

``DITLAB_FAULT="<point>@<n>:<action>[,...]"`` carries out ``action`` the n-th time (1-based, per
process) the code passes ``point``. Actions: ``kill`` (SIGKILL this process: no handler, no
cleanup, as a node failure), ``enospc`` (OSError "No space left on device"), ``sigterm`` /
``sigusr1`` (that signal to this process, as a scheduler sends it), ``nan`` (the batch becomes NaN).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

import torch
from lightning import Callback

FAULT_ENV = "DITLAB_FAULT"
ACTIONS = ("kill", "enospc", "nan", "sigterm", "sigusr1")
_passes: Counter = Counter()


def reset() -> None:
    """Forget the passes counted so far (tests that inject faults in-process, one after another)."""
    _passes.clear()


def _plan() -> dict[tuple[str, int], str]:
    plan = {}
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        where, _, action = item.partition(":")
        point, _, n = where.partition("@")
        if action not in ACTIONS or not n.isdigit():
            raise ValueError(f"{FAULT_ENV}={item!r}; expected <point>@<n>:<{'|'.join(ACTIONS)}>")
        plan[(point.strip(), int(n))] = action
    return plan


def _perform(action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action in ("sigterm", "sigusr1"):  # handled asynchronously, as a scheduler's signal is
        os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGUSR1)


class _FailingFile:
    """A file being written that meets its fault after the first chunk (a truncated file on disk)."""

    def __init__(self, f, action: str):
        self.f, self.action, self.written = f, action, 0

    def write(self, data) -> int:
        if self.written > 0:
            _perform(self.action)
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fault_point(point: str, target=None):
    """Count a pass through ``point`` and carry out the fault planned for this pass, if any. Returns
    ``target``: a file being written comes back wrapped (it fails half-way), a batch tensor filled
    with NaN for ``nan``; otherwise the action happens now."""
    if FAULT_ENV not in os.environ:
        return target
    _passes[point] += 1
    action = _plan().get((point, _passes[point]))
    if action is None:
        return target
    if hasattr(target, "write"):
        return _FailingFile(target, action)
    if action == "nan":
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"{FAULT_ENV}: 'nan' at {point!r} needs a batch; expected it at the 'batch' point")
        target.fill_(float("nan"))
        return target
    _perform(action)
    return target


class FaultInjection(Callback):
    """The training loop's fault points (test-only): ``batch`` before each step, ``step`` after it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        fault_point("batch", batch[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fault_point("step")
