"""Small helpers shared by the commands, the LightningModule and the callbacks."""

from __future__ import annotations

import sys
from collections.abc import Callable


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers such as (seed, rank, step): deterministic across processes
    (Python hashes tuples of ints without randomisation), so a resumed run redraws the same stream."""
    return hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF


def at_optimizer_step(trainer, every_n_steps: int) -> bool:
    """True once per optimizer step whose number is a positive multiple of ``every_n_steps``
    (with gradient accumulation: only on the micro-batch that completes the step)."""
    step = trainer.global_step
    return every_n_steps > 0 and step > 0 and step % every_n_steps == 0 and not trainer.fit_loop._should_accumulate()


def exit_on_error(prog: str, fn: Callable, *args, errors=(ValueError, FileNotFoundError)):
    """Run a command; a bad input becomes one line on stderr and exit status 2 (no traceback)."""
    try:
        return fn(*args)
    except errors as err:
        print(f"{prog}: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
