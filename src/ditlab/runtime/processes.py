"""Where this process stands among the processes of one job (torchrun, srun, Lightning's DDP
launcher), read from the environment they set; how it ends with them; how it waits for them; and
what it says when one of them is gone."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple

LOST_RANK_EXIT = 5  # another process of the job stopped: relaunch every node with ckpt_path=last
SLURM_INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning's rule: such jobs launch their own ranks


class Rank(NamedTuple):
    rank: int  # among all processes of the job
    world_size: int
    local_rank: int  # among the processes of this node


def launched_by_srun() -> bool:
    """Whether srun started this process as one task of a job (the rule Lightning's SLURMEnvironment
    uses, so that prepare, sample and train count the same ranks)."""
    env = os.environ
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE_JOB_NAMES


def process_rank() -> Rank:
    """This process's place: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK), else srun's
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else Lightning's launcher on one node (LOCAL_RANK,
    WORLD_SIZE); a single process when none are set."""
    env = os.environ
    if "RANK" in env:
        return Rank(int(env["RANK"]), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    if launched_by_srun():
        return Rank(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    if "LOCAL_RANK" in env and int(env.get("NODE_RANK", 0)) == 0:
        local = int(env["LOCAL_RANK"])
        return Rank(local, int(env.get("WORLD_SIZE", 1)), local)
    return Rank(0, 1, 0)


def launched_by_a_local_agent() -> bool:
    """Whether this process's parent is a launcher on this node that it must not outlive: torchrun's
    agent, or rank 0 for the ranks Lightning's launcher started."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or ("RANK" not in env and int(env.get("LOCAL_RANK", 0)) > 0)


def die_with_parent() -> None:
    """Under a local launcher (Linux): get SIGTERM when it dies, even by kill -9, so that no orphaned
    rank keeps memory and cores (seen: 63 orphans of a devices=64 run)."""
    if sys.platform.startswith("linux") and launched_by_a_local_agent():
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# ------------------------------------------------------------------------------------------ waiting
class WaitTimeout(TimeoutError):
    """What a rank waited for did not happen in time (one line, for the command's error message)."""


def wait_until(done: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    """Poll ``done`` until it is true; after ``timeout_s`` raise WaitTimeout naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise WaitTimeout(f"waited {timeout_s:g} s for {what}; expected it sooner (did a rank stop?)")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------ a lost rank
# What a collective raises when a peer's process or node is gone (gloo's and NCCL's wording).
PEER_GONE = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote process exited",
    "nccl communicator was aborted",
)


class LostRank(RuntimeError):
    """Another process of the job stopped mid-run; the message names it (one line)."""


def peer_gone(err: BaseException | None) -> str | None:
    """The reason, when ``err`` (or what caused it) is a collective failing because a peer is gone."""
    while err is not None:
        if isinstance(err, RuntimeError):
            found = [phrase for phrase in PEER_GONE if phrase in str(err).lower()]
            if found:
                return found[0]
        err = err.__cause__ or err.__context__
    return None


def lost_ranks(store, rank: int, world_size: int, wait_s: float = 5.0) -> list[int] | None:
    """The ranks of the job that did not answer within ``wait_s``, asked through the job's key-value
    ``store`` after a collective failed: every survivor says it is alive, whoever stays silent is
    lost. None when the store itself is unreachable (its host, rank 0's node, is the one lost)."""
    try:
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(f"ditlab/alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r in range(world_size) if r != rank and not store.check([f"ditlab/alive/{r}"])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - any failure to reach the store means its host is gone
        return None


def lost_rank_message(rank: int, world_size: int, lost: list[int] | None, step: int, reason: str) -> str:
    """One line: which rank is gone, at which step, and how to continue."""
    if lost is None:
        who, why = f"lost rank 0 of {world_size}", "its node held the job's store, now unreachable; "
    elif lost:
        who, why = f"lost rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {world_size}", ""
    else:
        who, why = f"lost a rank of {world_size}", "every rank answered afterwards: a network fault?; "
    return (
        f"{who} at step {step} ({why}seen by rank {rank}: {reason}); relaunch every node with ckpt_path=last "
        "to continue from the last checkpoint"
    )
