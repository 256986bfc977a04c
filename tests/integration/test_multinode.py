"""Off one machine, rehearsed on the CPU with gloo: two torchrun "nodes" on 127.0.0.1, two processes
launched as srun launches them (the SLURM variables Lightning's SLURMEnvironment reads) and the
1-node 2-process run they must equal, weights bit for bit; a node killed mid-run and relaunched;
``ditlab.sample`` under torchrun across two nodes.

The torchrun run also prepares its data (``prepare_if_missing``: each rank encodes its share, rank 0
waits for every shard before meta.json, rank 1 waits for meta.json) and counts the collectives of
every step (``probes.CollectiveProbe``): the non-logging steps run none but the gradients'. The
other runs train on what it prepared, without ``model.*`` overrides and without repeating the
reference override: the model's shape and the FID's extractor come from the prepared dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_same_state, cli_env, make_image_folder, read_meta, temps, tiny_overrides
from ports import free_port

TESTS = Path(__file__).resolve().parents[1]  # probes.py
STEPS = 4  # log, agree on preemption and checkpoint every 2: steps 1 and 3 are the non-logging ones
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK")


# ------------------------------------------------------------------------------------------ launching
def clean_env(**extra) -> dict:
    """The test's environment without any launcher's variables (a pytest run under SLURM or torchrun
    must not leak its ranks), tests/ on the path for the probes."""
    env = {k: v for k, v in cli_env().items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def start(argv: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A process in its own session (a "node": killing the session kills everything it started)."""
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def torchrun_node(node: int, port: int, module: str, args: list[str], cwd: Path, log: Path, **env) -> subprocess.Popen:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1"]
    argv += ["--master_addr=127.0.0.1", f"--master_port={port}", "-m", module, *args]
    return start(argv, cwd, clean_env(**env), log)


def srun_task(rank: int, job_id: str, args: list[str], cwd: Path, log: Path, **env) -> subprocess.Popen:
    """One task of a 2-node job (1 task a node) with the variables srun sets; the rendezvous port is
    the one Lightning derives from the job id (15000 + its last 4 digits), as on a real cluster."""
    slurm = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "ditlab-test",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(rank),
        "SLURM_JOB_NODELIST": "127.0.0.1",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_TASKS_PER_NODE": "1(x2)",
    }
    return start([sys.executable, "-m", "ditlab.train", *args], cwd, clean_env(**slurm, **env), log)


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> None:
    for proc, log in zip(procs, logs):
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, log.read_text()[-4000:]


def session_processes(session: int) -> list[int]:
    """The live processes of a session (what a "node" started and might leave behind)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields[3]: the session id; Z: a zombie
            found.append(int(stat.parent.name))
    return found


# ------------------------------------------------------------------------------------------ the runs
def run_args(images: Path, prepared: Path, root: Path, name: str, extra=()) -> list[str]:
    """The tiny run of every test here: 4 steps of batch 8 a rank, logs and checkpoints every 2, a
    grid and an FID (clf, 6 samples) at the end, fast EMA and lr (every update shows in the weights)."""
    return tiny_overrides(
        prepared,
        root,
        steps=STEPS,
        extra=[
            f"run_name={name}",
            "prepare_if_missing=true",
            f"data.source.root={images}",
            "data.source.image_size=8",
            "data.source.val_fraction=0.25",
            "encode.num_workers=0",
            "encode.progress=false",
            "trainer.log_every_n_steps=2",
            "callbacks.checkpoint.every_n_train_steps=2",
            "callbacks.checkpoint.keep_last=0",
            "module.ema_decay=0.5",
            "optim.optimizer.lr=1e-2",
            "fid_protocol.num_samples=6",
            "fid_protocol.batch_size=4",
            "+fid_protocol.sampler._target_=ditlab.diffusion.Sampler",
            "+fid_protocol.sampler.name=dpmpp_2m",
            "+fid_protocol.sampler.steps=3",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    images = make_image_folder(root / "images", per_class=16, size=(8, 8), corrupt=False)  # prepare_tiny_folder's
    return root, images, root / "latents"


@pytest.fixture(scope="module")
def torchrun_run(space):
    """Two torchrun nodes: prepare the tiny folder (with its clf reference), then train on it."""
    root, images, prepared = space
    port = free_port()
    probe = root / "probe"
    args = run_args(
        images,
        prepared,
        root,
        "torchrun",
        ["data.reference.extractor=clf", "data.reference.classifier_steps=20", "trainer.num_nodes=2"]
        + ["+callbacks.probe._target_=probes.CollectiveProbe", f"+callbacks.probe.dir={probe}"],
    )
    logs = [root / f"torchrun_node{n}.log" for n in (0, 1)]
    started = time.time()
    nodes = [torchrun_node(n, port, "ditlab.train", args, root, logs[n]) for n in (0, 1)]
    finish(nodes, logs)
    return root / "outputs" / "train" / "torchrun", logs, probe, time.time() - started


@pytest.fixture(scope="module")
def one_node_run(space, torchrun_run):
    """The reference: one node, two processes (Lightning's launcher), on the data torchrun prepared."""
    root, images, prepared = space
    log = root / "one_node.log"
    started = time.time()
    proc = start(
        [sys.executable, "-m", "ditlab.train", *run_args(images, prepared, root, "one_node", ["trainer.devices=2"])],
        root,
        clean_env(),
        log,
    )
    finish([proc], [log])
    return root / "outputs" / "train" / "one_node", time.time() - started


def assert_one_complete_run(run: Path, fid_extractor: str = "clf", periodic=("step_0000002.ckpt", "step_0000004.ckpt")):
    """One run dir; rank 0 wrote the checkpoints (whole, no temps), one grid, one FID."""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", *periodic]
    assert [p.name for p in (run / "samples").iterdir()] == ["step_0000004.png"]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["global_step"] == STEPS and summary["metrics"][f"val/fid_{fid_extractor}"] > 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["callbacks"]["Throughput"]["images_seen"] == STEPS * 8 * 2  # both ranks' images counted


def _items(prepared: Path, split: str) -> list[tuple[bytes, int]]:
    from litdata import StreamingDataset

    data = StreamingDataset(str(prepared / split))
    return sorted((np.asarray(data[i]["latent"]).tobytes(), int(data[i]["label"])) for i in range(len(data)))


# ------------------------------------------------------------------------------------------ the tests
@pytest.mark.slow  # two 2-node launches (~60 s on 2 cores): make test-slow, which CI runs after make test
def test_two_torchrun_nodes_prepare_then_train_to_the_one_node_weights(space, torchrun_run, one_node_run, prepared):
    run, logs, _, _ = torchrun_run
    root, _, latents = space
    # one run dir for both nodes, rank 0's checkpoints, one grid, one FID
    assert sorted(d.name for d in (root / "outputs" / "train").iterdir()) == ["one_node", "torchrun"]
    assert_one_complete_run(run)
    assert_one_complete_run(one_node_run[0])
    assert_same_state(run / "checkpoints" / "last.ckpt", one_node_run[0] / "checkpoints" / "last.ckpt")
    # the data both nodes prepared is the one a single process prepares: same items, same counts
    ours, single = read_meta(latents), read_meta(prepared)
    assert ours["splits"] == single["splits"] and ours["latent_shape"] == single["latent_shape"] == [3, 8, 8]
    for split in ("train", "val"):
        assert _items(latents, split) == _items(prepared, split)
    assert not (latents / ".rank_counts").exists() and (latents / "reference_clf.npz").is_file()
    # the first lines say what the model took from the data and what the FID measures against
    text = (run / "train.log").read_text()
    assert "2 processes (2 nodes x 1) started by TorchElasticEnvironment" in text
    assert "model shape from the data: input_size=8, in_channels=3, num_classes=3" in text
    assert f"FID reference statistics: {latents / 'reference_clf.npz'} (fid_protocol.extractor=clf)" in text
    stored = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["ditlab"]
    assert "input_size: 8\n  patch_size: 2\n  in_channels: 3" in stored["config_yaml"]
    assert "num_classes: 3" in stored["config_yaml"] and stored["classes"] == ["cat", "dog", "fox"]


@pytest.mark.slow  # the 2-node run above
def test_non_logging_steps_run_no_collective_but_the_gradients(torchrun_run):
    _, _, probe, _ = torchrun_run
    for rank in (0, 1):
        batches = json.loads((probe / f"collectives_rank{rank}.json").read_text())
        assert [b["logs"] for b in batches] == [False, True, False, True]
        quiet = [b["calls"] for b in batches if not b["logs"]]
        assert quiet == [{}, {}], f"rank {rank}: collectives on non-logging steps: {quiet}"
        # the probe sees collectives where there are some: the logged means and the preemption agreement
        assert sum(batches[1]["calls"].values()) > 0 and batches[1]["calls"].get("all_reduce", 0) >= 1


@pytest.mark.slow  # the preempted srun tasks below end equal to the one-node run and complete too
def test_two_srun_tasks_train_to_the_one_node_weights(space, torchrun_run, one_node_run):
    root, images, prepared = space
    port = free_port(15000, 24999)
    job_id = f"77{port - 15000:04d}"  # Lightning's SLURMEnvironment: port 15000 + the job id's last 4 digits
    args = run_args(images, prepared, root, "srun", ["trainer.num_nodes=2"])
    logs = [root / f"srun_task{r}.log" for r in (0, 1)]
    started = time.time()
    finish([srun_task(r, job_id, args, root, logs[r]) for r in (0, 1)], logs)
    seconds = time.time() - started
    run = root / "outputs" / "train" / "srun"
    assert_one_complete_run(run)
    assert_same_state(run / "checkpoints" / "last.ckpt", one_node_run[0] / "checkpoints" / "last.ckpt")
    assert "2 processes (2 nodes x 1) started by SLURMEnvironment" in (run / "train.log").read_text()
    times = f"torchrun 2 nodes with prepare {torchrun_run[3]:.1f}, 1 node x 2 {one_node_run[1]:.1f}, srun {seconds:.1f}"
    print(f"\nmulti-node runs (s): {times}")


@pytest.mark.slow  # a 2-node launch (~40 s); in make test: test_preemption.py (one process) and test_kill9.py
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(space, one_node_run):
    """SIGTERM to task 1 alone, at the end of step 1: the ranks agree at step 2 (the next logging
    step, no collective before), both stop there with one checkpoint and exit 75; relaunched, they
    end where the uninterrupted run ends."""
    root, images, prepared = space
    port = free_port(15000, 24999)
    job_id = f"78{port - 15000:04d}"
    faults = "+callbacks.faults._target_=ditlab.runtime.faults.FaultInjection"
    args = run_args(images, prepared, root, "preempted", ["trainer.num_nodes=2", faults])
    logs = [root / f"preempted_task{r}.log" for r in (0, 1)]
    tasks = [
        srun_task(0, job_id, args, root, logs[0]),
        srun_task(1, job_id, args, root, logs[1], DITLAB_FAULT="step@1:sigterm"),
    ]
    assert [task.wait(timeout=300) for task in tasks] == [75, 75], logs[0].read_text()[-3000:]
    said = [line for line in logs[0].read_text().splitlines() if line.startswith("ditlab.train: preempted")]
    assert len(said) == 1 and said[0].startswith("ditlab.train: preempted by a signal on another rank at step 2;")
    checkpoints = root / "outputs" / "train" / "preempted" / "checkpoints"
    stopped = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert stopped["global_step"] == 2
    logs = [root / f"resumed_task{r}.log" for r in (0, 1)]
    port = free_port(15000, 24999)
    finish([srun_task(r, f"79{port - 15000:04d}", args, root, logs[r]) for r in (0, 1)], logs)
    assert_same_state(checkpoints / "last.ckpt", one_node_run[0] / "checkpoints" / "last.ckpt")
    assert not list(checkpoints.glob("last-v*.ckpt"))  # the resumed run went on in last.ckpt itself
    # what an uninterrupted srun run leaves (test_two_srun_tasks_..., in make test-slow): one run dir
    # of rank 0's checkpoints, one grid, one FID, both ranks' images counted
    # no step_0000002.ckpt: the preemption at step 2 stops the run before the periodic checkpoint
    # callback's turn (Lightning runs checkpoint callbacks last); its state is the last.ckpt resumed from
    assert_one_complete_run(checkpoints.parent, periodic=("step_0000004.ckpt",))
    assert "2 processes (2 nodes x 1) started by SLURMEnvironment" in (checkpoints.parent / "train.log").read_text()


@pytest.mark.slow  # one torchrun node x 2 processes: test_sample_torchrun.py, in make test
def test_sample_under_two_torchrun_nodes_writes_what_one_process_writes(space, one_node_run):
    root = space[0]
    ckpt = one_node_run[0] / "checkpoints" / "last.ckpt"
    args = ["num_samples=6", "batch_size=2", "sampler=ddim50", "steps=2", f"ckpt={ckpt}"]
    port = free_port()
    logs = [root / f"sample_node{n}.log" for n in (0, 1)]
    nodes = [
        torchrun_node(n, port, "ditlab.sample", [*args, f"out={root / 'sampled2'}"], root, logs[n]) for n in (0, 1)
    ]
    single = start(
        [sys.executable, "-m", "ditlab.sample", *args, f"out={root / 'sampled1'}"],
        root,
        clean_env(),
        root / "sample1.log",
    )
    finish([*nodes, single], [*logs, root / "sample1.log"])
    two, one = (sorted((root / d).glob("*.npz")) for d in ("sampled2", "sampled1"))
    assert [p.name for p in two] == [p.name for p in one] == ["samples_6x8x8x3.npz"]  # one file, no parts left
    with np.load(two[0]) as a, np.load(one[0]) as b:
        assert np.array_equal(a["labels"], b["labels"])
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # per-sample noise: batch-free


@pytest.mark.slow  # two 2-node launches
def test_a_killed_node_is_named_then_a_relaunch_equals_the_uninterrupted_run(space, one_node_run):
    """kill -9 node 0 while its rank writes last.ckpt (the fault leaves ``.last.ckpt.tmp-<host>-<pid>``),
    then its whole session: node 1 exits by itself, non-zero, naming rank 0, and leaves no process.
    Both relaunched with ckpt_path=last end where the uninterrupted run ends, the temp gone."""
    root, images, prepared = space
    args = run_args(images, prepared, root, "killed", ["trainer.num_nodes=2"])
    port = free_port()
    logs = [root / f"killed_node{n}.log" for n in (0, 1)]
    nodes = [
        torchrun_node(0, port, "ditlab.train", args, root, logs[0], DITLAB_FAULT="ckpt_write@2:kill"),
        torchrun_node(1, port, "ditlab.train", args, root, logs[1]),
    ]
    checkpoints = root / "outputs" / "train" / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not temps(checkpoints) and time.time() < deadline and nodes[1].poll() is None:
        time.sleep(0.05)
    assert temps(checkpoints), logs[0].read_text()[-3000:]
    os.killpg(nodes[0].pid, signal.SIGKILL)  # the rest of node 0: its agent
    killed_at = time.time()
    nodes[1].wait(timeout=90)
    waited = time.time() - killed_at
    nodes[0].wait(timeout=10)
    assert waited < 60 and nodes[1].returncode != 0
    errors = [line for line in logs[1].read_text().splitlines() if line.startswith("ditlab.train: error:")]
    assert len(errors) == 1 and "lost rank 0 of 2 at step 2" in errors[0], logs[1].read_text()[-3000:]
    time.sleep(1)
    assert session_processes(nodes[0].pid) == [] and session_processes(nodes[1].pid) == []

    port = free_port()
    logs = [root / f"relaunched_node{n}.log" for n in (0, 1)]
    finish([torchrun_node(n, port, "ditlab.train", args, root, logs[n]) for n in (0, 1)], logs)
    assert_same_state(checkpoints / "last.ckpt", one_node_run[0] / "checkpoints" / "last.ckpt")
    assert not temps(checkpoints), "the killed write's temp file is still there"
    print(f"\nkill -9 of node 0: node 1 exited {waited:.1f} s later with: {errors[0]}")


@pytest.mark.slow  # one more 2-node launch
def test_nodes_that_name_different_run_dirs_stop_at_set_up_with_one_line(space):
    """Each node composes its own config: a run_name that differs (a default timestamp that two nodes
    do not share) would split the run in two; both stop before the first step instead."""
    root, images, prepared = space
    port = free_port()
    logs = [root / f"split_node{n}.log" for n in (0, 1)]
    nodes = [
        torchrun_node(
            n,
            port,
            "ditlab.train",
            run_args(images, prepared, root, f"split{n}", ["trainer.num_nodes=2"]),
            root,
            logs[n],
        )
        for n in (0, 1)
    ]
    assert [node.wait(timeout=300) for node in nodes] != [0, 0]
    for log in logs:
        errors = [line for line in log.read_text().splitlines() if line.startswith("ditlab.train: error:")]
        assert len(errors) == 1 and "but rank 1 to" in errors[0] and "same run_name" in errors[0], log.read_text()[
            -2000:
        ]
    assert not (root / "outputs" / "train" / "split0" / "checkpoints").exists()
