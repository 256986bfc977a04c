"""Logger factories. W&B's ``mode: auto`` goes online only when it can: an API key (or a login
in ~/.netrc) and the W&B server reachable; otherwise it logs offline (``wandb sync`` later).

A resumed run continues its logs: the W&B run id is kept in ``<run dir>/wandb_run_id`` (so the
resumed process logs into the same W&B run, ``resume="allow"``), and the CSV logger appends to the
run dir's one ``metrics.csv`` instead of deleting it (Lightning's CSVLogger removes an existing file).
"""

from __future__ import annotations

import csv
import netrc
import os
import secrets
import socket
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from ditlab.runtime.files import atomic_path, write_text
from ditlab.runtime.sweeps import job_overrides, wandb_group

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


RUN_ID_FILE = "wandb_run_id"


def persistent_run_id(save_dir: str | Path) -> str:
    """This run dir's W&B id: read from ``wandb_run_id``, or made and written there (atomically)."""
    path = Path(save_dir) / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids: 8 lowercase alphanumerics, as wandb.util.generate_id()
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) != 0:
        return run_id  # only rank 0 logs to W&B (and owns the file); other ranks must not race for it
    write_text(path, run_id + "\n")
    return run_id


def csv_logger(save_dir: str, name: str = "csv", version: str | int | None = "run", **kwargs):
    """Lightning's CSVLogger that appends to an existing ``metrics.csv`` (a resumed run's rows follow the first's)."""

    class AppendingWriter(ExperimentWriter):
        _resumed = False

        def _check_log_dir_exists(self) -> None:  # Lightning's deletes the earlier metrics.csv here
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    header = next(csv.reader(f), [])
                self.metrics_keys = sorted(header)
                self._resumed = True

        def log_metrics(self, metrics_dict, step=None) -> None:
            if self._resumed and step is not None:
                # The first row of a resumed run: rows at or after its step were logged by the
                # interrupted run after its last checkpoint; the resumed run logs them again.
                self._resumed = False
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    rows = list(csv.DictReader(f))
                kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) < step]
                if len(kept) != len(rows):
                    with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
                        writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                        writer.writeheader()
                        writer.writerows(kept)
            super().log_metrics(metrics_dict, step)

    class AppendingCSVLogger(CSVLogger):
        def after_save_checkpoint(self, checkpoint_callback) -> None:
            self.save()  # flush with every checkpoint: a kill -9 then loses at most the rows since it

        @property
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=save_dir, name=name, version=version, **kwargs)


def wandb_logger(
    project: str = "ditlab",
    name: str | None = None,
    save_dir: str = ".",
    mode: str = "auto",
    group: str | None = None,
    **kwargs,
):
    """W&B's logger; ``group`` None: the run's config without its seed (``sweeps.wandb_group``), so that
    the runs of one config over several seeds share a group (W&B then shows their mean and spread)."""
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
        id=kwargs.pop("id", None) or persistent_run_id(save_dir),
        resume="allow",
        group=group or wandb_group(job_overrides()),
        **kwargs,
    )
