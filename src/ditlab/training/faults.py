"""Fault injection for the reliability tests, and nothing else: a no-op unless ``DITLAB_FAULT`` is set.

``DITLAB_FAULT="<point>@<n>:<action>[,...]"`` performs ``action`` at the n-th time (1-based, per
process) the code passes ``point``. Points: ``ckpt_write`` (half-way through writing a checkpoint
file), ``ckpt_saved`` (right after a checkpoint file is renamed into place: between ``step_N.ckpt``
and ``last.ckpt``), ``step`` (after an optimizer step, before the checkpoint callback),
``batch`` (a training batch, before its step), ``prepare_batch`` (after prepare wrote a batch).
Actions: ``kill`` (SIGKILL this process: no handler, no cleanup, as a node failure), ``enospc``
(raise OSError "No space left on device"), ``sigterm`` / ``sigusr1`` (send that signal to this
process, as a scheduler would), ``nan`` (returned to the caller, which poisons its batch).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

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


def perform_fault(action: str) -> str:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action in ("sigterm", "sigusr1"):  # what a scheduler sends: handled asynchronously, like the real one
        os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGUSR1)
    return action


def fault_point(point: str, perform: bool = True) -> str | None:
    """Count a pass through ``point``; the planned action for this pass (performed unless ``perform=False``)."""
    if FAULT_ENV not in os.environ:
        return None
    _passes[point] += 1
    action = _plan().get((point, _passes[point]))
    if action is None:
        return None
    return perform_fault(action) if perform else action
