"""What a rank of a multi-process job knows without its peers: its place (torchrun, srun, Lightning's
launcher), which temporaries are a dead writer's (on this host by pid, on another by age), how it
names a lost peer, when it waits, and on which steps the ranks agree on a preemption signal."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from ditlab.runtime import files
from ditlab.runtime.preemption import Preemption
from ditlab.runtime.processes import (
    Rank,
    WaitTimeout,
    lost_rank_message,
    lost_ranks,
    peer_gone,
    process_rank,
    wait_until,
)

LAUNCHERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@pytest.fixture
def no_launcher(monkeypatch):
    for name in (*LAUNCHERS, "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, Rank(0, 1, 0)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, Rank(3, 4, 1)),  # torchrun
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}, Rank(2, 4, 0)),  # srun
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_NAME": "interactive"}, Rank(0, 1, 0)),  # salloc shell
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, Rank(1, 2, 0)),  # torchrun in srun
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, Rank(1, 2, 1)),  # Lightning's launcher, one node
    ],
)
def test_process_rank_reads_the_launcher_that_started_it(no_launcher, env, expected):
    for name, value in env.items():
        no_launcher.setenv(name, value)
    assert process_rank() == expected


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_temps_this_host_by_pid_another_host_by_age(tmp_path):
    here, dead = socket.gethostname(), _dead_pid()
    names = {
        "dead_here": f".last.ckpt.tmp-{here}-{dead}",
        "live_here": f".step_2.ckpt.tmp-{here}-{os.getppid()}",
        "old_style_dead": f".step_4.ckpt.tmp-{dead}",  # the names before hosts were part of them
        "elsewhere_old": f".step_6.ckpt.tmp-node-17-{os.getpid()}",  # a pid here means nothing for node-17
        "elsewhere_fresh": f".step_8.ckpt.tmp-node-17-{dead}",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"part of a checkpoint")
    old = time.time() - files.FOREIGN_STALE_S - 60
    os.utime(tmp_path / names["elsewhere_old"], (old, old))
    removed = {p.name for p in files.remove_stale_temps(tmp_path)}
    assert removed == {names["dead_here"], names["old_style_dead"], names["elsewhere_old"]}
    assert {p.name for p in tmp_path.iterdir()} == {names["live_here"], names["elsewhere_fresh"]}
    assert files.temp_path(tmp_path / "last.ckpt").name == f".last.ckpt.tmp-{here}-{os.getpid()}"


def test_a_folder_being_filled_on_another_host_is_not_stale_while_a_file_in_it_grows(tmp_path):
    folder = tmp_path / f".vae.tmp-node-17-{_dead_pid()}"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"growing")
    old = time.time() - files.FOREIGN_STALE_S - 60
    os.utime(folder, (old, old))  # the folder's own time is old; the file in it was just written
    assert not files.is_stale(folder)
    os.utime(folder / "weights.safetensors", (old, old))
    assert files.is_stale(folder)


def test_a_peer_gone_is_told_from_other_errors():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:44956")
    try:
        try:
            raise gloo
        except RuntimeError as err:
            raise RuntimeError("DDP backward failed") from err
    except RuntimeError as wrapped:
        assert peer_gone(wrapped) == "connection closed by peer"
    assert peer_gone(RuntimeError("CUDA out of memory")) is None and peer_gone(ValueError("broken pipe")) is None


def test_lost_ranks_are_the_ones_that_do_not_answer_through_the_store():
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    server = dist.TCPStore("127.0.0.1", number, 3, True, timedelta(seconds=10), wait_for_workers=False)
    peer = dist.TCPStore("127.0.0.1", number, 3, False, timedelta(seconds=10))
    peer.set("ditlab/alive/2", "1")  # rank 2 survived too; rank 1 is gone
    assert lost_ranks(server, rank=0, world_size=3, wait_s=0.5) == [1]
    message = lost_rank_message(0, 3, [1], 120, "connection closed by peer")
    assert message.startswith("lost rank 1 of 3 at step 120 (seen by rank 0: connection closed by peer); relaunch")
    assert "lost rank 0 of 2 at step 7 (its node held the job's store" in lost_rank_message(
        1, 2, None, 7, "broken pipe"
    )


def test_wait_until_names_what_it_waited_for():
    with pytest.raises(WaitTimeout, match="waited 0.2 s for rank 0 to write meta.json"):
        wait_until(lambda: False, 0.2, "rank 0 to write meta.json", poll_s=0.05)
    wait_until(lambda: True, 0.0, "nothing")


def test_ranks_agree_on_a_signal_on_logging_steps_and_at_the_last():
    def trainer(step, every=20, max_steps=1000):
        return SimpleNamespace(global_step=step, log_every_n_steps=every, max_steps=max_steps)

    default, every_5 = Preemption(), Preemption(check_every_n_steps=5)
    assert [s for s in range(1, 61) if default.agrees_now(trainer(s))] == [20, 40, 60]
    assert [s for s in range(1, 21) if every_5.agrees_now(trainer(s))] == [5, 10, 15, 20]
    assert default.agrees_now(trainer(33, max_steps=33))  # the last step, whatever its number
    with pytest.raises(ValueError, match="check_every_n_steps=0; expected >= 1"):
        Preemption(check_every_n_steps=0)
