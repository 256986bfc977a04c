"""A free TCP port on 127.0.0.1 for the servers the tests start (rendezvous, SLURM daemons)."""

from __future__ import annotations

import random
import socket


def free_port(low: int = 20000, high: int = 30000, taken: tuple[int, ...] = ()) -> int:
    """A port in [low, high] that binds now and is not in ``taken``."""
    for _ in range(200):
        port = random.randint(low, high)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{high}")
