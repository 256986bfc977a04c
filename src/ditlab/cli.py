"""How every command reports bad input: one line ``ditlab.<command>: error: ...`` and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


def exit_on_error(prog: str, fn: Callable, *args, errors=(ValueError, FileNotFoundError)):
    """Run a command; a bad input becomes one line on stderr and exit status 2 (no traceback)."""
    try:
        return fn(*args)
    except errors as err:
        print(f"{prog}: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
