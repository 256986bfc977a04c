"""Writing so that no reader ever sees half a file: every file and folder ditlab writes goes through
``atomic_path``. The content is written under a temporary name beside its target (the same
filesystem, so the rename is atomic), then renamed into place; when the writing fails the temporary
is removed and the target is left as it was.

Temporary names are ``.<name>.tmp-<host>-<pid>``: hidden, never mistaken for finished work (a
checkpoint glob ``*.ckpt`` does not match them), and ``remove_stale_temps`` can tell a dead writer's
leftovers from a live one's: on this host by its pid; a writer on another host (a shared filesystem:
the run dir of a multi-node job) cannot be asked, so its temporary counts as dead once it has not
changed for ``FOREIGN_STALE_S`` (a live writer keeps changing it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_MARK = ".tmp-"
FOREIGN_STALE_S = 3600.0  # unchanged this long, another host's temporary is a dead write


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{TEMP_MARK}{_host()}-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write a file or a folder at; rename it to ``target``
    when the block ends without an exception (an existing target is replaced), remove it when not.

    Writers that infer a format from the file name (numpy's ``.npz``, PIL) must be given the format
    or an open file: the temporary name ends in ``.tmp-<pid>``. ``durable``: fsync the file and the
    folder around the rename, so the new content survives a power cut (checkpoints).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    _remove(tmp)
    try:
        yield tmp
        publish(tmp, target, durable)
    except BaseException:
        _remove(tmp)
        raise


def publish(staged: Path, target: Path, durable: bool = False) -> None:
    """Rename a finished file or folder ``staged`` (beside ``target``) to ``target``, replacing it.
    ``atomic_path``'s last step; also what publishes a folder staged by several processes at once
    (a split's shards, ``ditlab.data.shards``)."""
    if durable and staged.is_file():
        _fsync(staged)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)  # a folder cannot be renamed over a non-empty one
    os.replace(staged, target)
    if durable:
        _fsync(target.parent)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    """JSON that is always valid: a non-finite float (a NaN loss) is written as null, never as NaN."""
    write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer(tmp: Path) -> tuple[str | None, int | None]:
    """(host, pid) of the process that named a temporary; host None for the names before hosts
    were part of them (``.<name>.tmp-<pid>``: written on this host)."""
    tag = tmp.name.rsplit(TEMP_MARK, 1)[-1]
    host, _, pid = tag.rpartition("-")
    return (host or None), (int(pid) if pid.isdigit() else None)


def _last_change(path: Path) -> float:
    """The newest modification time of a file, or of anything in a folder (a folder's own time does
    not change while a file in it grows)."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.rglob("*")]
    return max(times)


def is_stale(tmp: Path, now: float | None = None) -> bool:
    """Whether no live writer is behind a temporary: this host's by its pid (our own pid included: we
    are not writing it while we clean), another host's by ``FOREIGN_STALE_S`` without a change."""
    host, pid = _writer(tmp)
    if host is None or host == _host():
        return pid is None or pid == os.getpid() or not _alive(pid)
    return (now or time.time()) - _last_change(tmp) > FOREIGN_STALE_S


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temporaries that writers no longer alive left in ``directory`` (a kill -9 in the
    middle of a write leaves one); returns what was removed."""
    removed = []
    for tmp in Path(directory).glob(f".*{TEMP_MARK}*"):
        try:
            stale = is_stale(tmp)
        except FileNotFoundError:  # its writer renamed or removed it just now
            continue
        if stale:
            _remove(tmp)
            removed.append(tmp)
    return removed
