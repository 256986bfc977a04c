"""Logger factories. W&B's ``mode: auto`` goes online only when it can: an API key (or a login
in ~/.netrc) and the W&B server reachable; otherwise it logs offline (``wandb sync`` later)."""

from __future__ import annotations

import netrc
import os
import socket
from urllib.parse import urlparse

WANDB_MODES = ("auto", "online", "offline", "disabled")


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def wandb_can_go_online(timeout_s: float = 1.0) -> bool:
    host = _wandb_host()
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (FileNotFoundError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def wandb_logger(project: str = "ditlab", name: str | None = None, save_dir: str = ".", mode: str = "auto", **kwargs):
    from lightning.pytorch.loggers import WandbLogger

    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r}; expected one of {WANDB_MODES}")
    if os.environ.get("WANDB_MODE"):  # the user's environment wins
        mode = os.environ["WANDB_MODE"]
    elif mode == "auto":
        mode = "online" if wandb_can_go_online() else "offline"
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        offline=mode == "offline",
        mode=mode if mode == "disabled" else None,
        **kwargs,
    )
