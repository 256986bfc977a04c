"""A prepared dir in an object store (data.prepared_dir=s3://bucket/prefix), against a real S3-protocol
server on 127.0.0.1 (moto's server mode, in its own process): prepare writes what it writes locally,
training streams the same batches as from disk, survives the store going away mid-epoch (one line,
then an exact resume), and sample / evaluate read the store; bad buckets and credentials are one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from ditlab import evaluate as evaluate_command
from ditlab import prepare as prepare_command
from ditlab import sample as sample_command
from ditlab import train as train_command
from ditlab.bench.s3_server import LocalS3Server
from ditlab.data import storage
from ditlab.data.prepared import PreparedDir
from ditlab.inference import load_model
from ditlab.models.vae import codec_from_record
from ditlab.runtime import faults
from helpers import (
    S3_SERVERS,
    assert_same_state,
    cli_env,
    compose_cfg,
    compose_fault_run,
    compose_run,
    fault_overrides,
    folder_overrides,
    invoke_main,
    local_files,
    make_image_folder,
    prepare_from_config,
    rechunked,
    store_files,
    train_in_process,
)

TIMINGS = ("updated_at", "seconds")  # written into the JSON files by the clock, not by the data
SMALL_KL = ["vae=small_kl", "vae.recipe.max_steps=3", "vae.recipe.batch_size=8", "vae.recipe.scale_samples=16"]


@pytest.fixture(scope="module")
def s3_server():
    server = LocalS3Server().start()
    S3_SERVERS[server.port] = server
    yield server
    server.stop()
    S3_SERVERS.pop(server.port)


@pytest.fixture
def bucket(s3_server, tmp_path, monkeypatch):
    """A new bucket on the server, the AWS environment pointing at it (2 attempts: a lost server is
    reported within seconds) and the local cache in tmp_path."""
    for key, value in s3_server.environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    name = f"ditlab-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(name)
    return name


def prepare_small_kl(folder, where, tmp_path):
    """The small VAE (3 steps) and the fid_clf classifier (3 steps) on a tiny folder, into ``where``."""
    cfg = compose_cfg(
        "prepare",
        folder_overrides(
            folder,
            where,
            16,
            vae=None,
            extra=[*SMALL_KL, "data.reference.extractor=clf", "data.reference.classifier_steps=3"],
        ),
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    torch.manual_seed(0)  # the VAE's and the classifier's initial weights
    return prepare_from_config(cfg)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def without_timings(name: str, content: bytes):
    if not name.endswith(".json"):
        return content
    data = json.loads(content)
    return {k: v for k, v in data.items() if k not in TIMINGS} if isinstance(data, dict) else data


def test_an_interrupted_prepare_leaves_no_meta_json_and_its_rerun_finishes(
    bucket, s3_server, tmp_path, monkeypatch, capsys
):
    folder = make_image_folder(tmp_path / "images", per_class=8, size=(8, 8), corrupt=False)
    url = f"s3://{bucket}/tiny"
    args = [
        "data=folder",
        f"data.source.root={folder}",
        "data.source.image_size=8",
        "data.source.val_fraction=0.25",
        "vae=identity",
        f"data.prepared_dir={url}",
        "encode.num_workers=0",
        "encode.progress=false",
        "encode.batch_size=8",
        "data.reference.extractor=null",
        f"hydra.run.dir={tmp_path / 'prep'}",
    ]
    monkeypatch.setenv("DITLAB_FAULT", "prepare_batch@2:enospc")  # the second batch of latents fails
    faults.reset()
    code, _, err = invoke_main(prepare_command.main, "ditlab.prepare", args, monkeypatch, capsys)
    assert code != 0 and "No space left" in err
    assert "meta.json" not in store_files(s3_server, bucket, "tiny")
    assert not PreparedDir(url).is_prepared()
    monkeypatch.delenv("DITLAB_FAULT")
    code, _, err = invoke_main(prepare_command.main, "ditlab.prepare", args, monkeypatch, capsys)
    assert code == 0, err
    splits = PreparedDir(url).read_meta()["splits"]
    assert splits["train"]["count"] + splits["val"]["count"] == 24


def publish(prepared, url: str) -> None:
    """Put a local prepared dir into the store as prepare does: every file, meta.json last."""
    for entry in sorted(prepared.iterdir()):
        if entry.name != PreparedDir.META:
            storage.upload(entry, storage.join(url, entry.name))
    storage.upload_file(prepared / PreparedDir.META, storage.join(url, PreparedDir.META))


def test_training_streams_the_store_as_the_disk_and_resumes_exactly_after_an_outage(
    prepared, bucket, s3_server, tmp_path, monkeypatch, capsys
):
    """144 one-item chunks, 36 batches an epoch: litdata fetches at most 32 chunks ahead, so the run
    still has chunks to fetch when the server stops after step 2. One DataLoader worker, whose
    failure reaches the main process as a worker's traceback."""
    local = rechunked(prepared, tmp_path / "local", copies=4)
    url = f"s3://{bucket}/tiny"
    publish(local, url)
    loader = ["data.module.num_workers=1", "data.module.batch_size=4"]
    steps = 20
    uninterrupted = tmp_path / "uninterrupted"
    train_in_process(compose_fault_run(local, uninterrupted, steps=steps, extra=loader))

    out = tmp_path / "from_store"
    outage = ["+callbacks.outage._target_=helpers.StoreOutage", f"+callbacks.outage.port={s3_server.port}"]
    args = fault_overrides(url, tmp_path, steps=steps, extra=[*loader, *outage, "+callbacks.outage.at_step=2"])
    code, _, err = invoke_main(train_command.main, "ditlab.train", [*args, f"hydra.run.dir={out}"], monkeypatch, capsys)
    assert code == storage.StoreUnavailable.exit_code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ditlab.train: error: {url}/train/chunk-") and "after 2 attempts" in last, last
    written = sorted(int(p.stem.split("_")[1]) for p in (out / "checkpoints").glob("step_*.ckpt"))
    assert written and written[-1] < steps  # stopped part-way through the first epoch

    s3_server.start()  # the store is back (a new server process: its objects are put back)
    s3_server.create_bucket(bucket)
    publish(local, url)
    args = fault_overrides(url, tmp_path, steps=steps, extra=loader)
    code, _, err = invoke_main(train_command.main, "ditlab.train", [*args, f"hydra.run.dir={out}"], monkeypatch, capsys)
    assert code == 0, err
    assert_same_state(out / "checkpoints" / "last.ckpt", uninterrupted / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def small_kl_prepared(s3_server, tmp_path_factory):
    """The small-VAE folder prepared into the store and, identically, on local disk (bucket, url, local)."""
    tmp = tmp_path_factory.mktemp("small_kl")
    name = f"ditlab-{uuid.uuid4().hex[:10]}"
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.environment.items():
            env.setenv(key, value)
        env.setenv("DITLAB_CACHE", str(tmp / "cache"))
        s3_server.create_bucket(name)
        folder = make_image_folder(tmp / "images", per_class=8, size=(16, 16), corrupt=False)
        url = prepare_small_kl(folder, f"s3://{name}/tiny", tmp)
        local = prepare_small_kl(folder, tmp / "local", tmp)
    return name, url, local


def test_prepare_writes_to_the_store_what_it_writes_to_a_local_dir(small_kl_prepared, s3_server):
    bucket, url, local = small_kl_prepared
    remote, here = store_files(s3_server, bucket, "tiny"), local_files(local)
    assert sorted(remote) == sorted(here)
    assert {"meta.json", "train/index.json", "vae/ditlab_vae.json", "classifier/classifier.json"} <= set(remote)
    assert "reference_clf.npz" in remote and any(n.startswith("vae/") and n.endswith(".safetensors") for n in remote)
    meta_remote, meta_local = json.loads(remote.pop("meta.json")), json.loads(here.pop("meta.json"))
    assert meta_remote["vae"].pop("path") == f"{url}/vae"  # the store's own folder, not the staging one
    assert meta_local["vae"].pop("path") == str(local / "vae")
    assert meta_remote == meta_local
    different = [n for n in remote if without_timings(n, remote[n]) != without_timings(n, here[n])]
    assert not different


def test_sample_and_evaluate_read_a_prepared_dir_in_the_store(
    small_kl_prepared, bucket, s3_server, tmp_path, monkeypatch, capsys
):
    """A run trained from the store (the model's shape from its meta.json, fid_protocol.extractor=auto
    from the statistics it holds, its grid decoded with the store's VAE, its FID with the store's
    classifier and statistics, copied into the run dir); sample then needs only the checkpoint, and
    evaluate reads the store with nothing cached here."""
    _, url, local = small_kl_prepared
    run = tmp_path / "run"
    metrics = train_in_process(compose_run(url, run, steps=2, extra=[*SMALL_KL, "fid_protocol.num_samples=6"]))
    assert "val/fid_clf" in metrics and (run / "samples").is_dir()
    kept = run / "fid_reference"
    assert (kept / "reference_clf.npz").read_bytes() == (local / "reference_clf.npz").read_bytes()
    assert (kept / "classifier" / "classifier.json").is_file()
    shutil.rmtree(tmp_path / "cache")

    def sample(out, *more):
        args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "num_samples=6", "steps=3", f"out={out}", *more]
        code, _, err = invoke_main(sample_command.main, "ditlab.sample", args, monkeypatch, capsys)
        assert code == 0, err
        return next(out.glob("samples_*.npz"))

    from_store = sample(tmp_path / "from_store")
    assert not (tmp_path / "cache").exists()  # the checkpoint carries the small VAE: nothing fetched
    # the codec it decoded with is the one prepare wrote (scale factor and weights), as read from local disk
    codec = load_model(run / "checkpoints" / "last.ckpt").codec
    on_disk = codec_from_record(PreparedDir(local).read_meta()["vae"], PreparedDir(local).vae)
    assert codec.scale_factor == on_disk.scale_factor
    assert_same_tensors(codec.state_dict(), on_disk.state_dict())

    def evaluate(reference):
        out = tmp_path / f"metrics_{len(list(tmp_path.glob('metrics_*')))}.json"
        args = [f"samples={from_store}", f"reference={reference}", "extractor=clf", "metrics=[fid]", f"out={out}"]
        code, _, err = invoke_main(evaluate_command.main, "ditlab.evaluate", args, monkeypatch, capsys)
        assert code == 0, err
        (entry,) = json.loads(out.read_text())["evaluations"]
        return entry["metrics"], entry["protocol"]["reference"], entry["reproduce"]["evaluate"]

    (from_url, named, again), (from_disk, _, _), (from_file, _, _) = (
        evaluate(url),
        evaluate(local),
        evaluate(f"{url}/reference_clf.npz"),
    )
    assert from_url == from_disk == from_file
    assert named == f"{url}/reference_clf.npz" and f"reference={named}" in again  # the store's, not the cache's


def test_a_missing_bucket_or_refused_credentials_is_one_line_naming_the_url(
    prepared, bucket, tmp_path, monkeypatch, capsys
):
    missing = f"s3://no-bucket-{uuid.uuid4().hex[:8]}/tiny"
    for main, prog, args in (
        (prepare_command.main, "ditlab.prepare", [f"data.prepared_dir={missing}", f"hydra.run.dir={tmp_path / 'p'}"]),
        (train_command.main, "ditlab.train", [*fault_overrides(missing, tmp_path), f"hydra.run.dir={tmp_path / 't'}"]),
    ):
        code, _, err = invoke_main(main, prog, args, monkeypatch, capsys)
        assert code == 2, err
        assert err.strip().splitlines()[-1] == (
            f"{prog}: error: {missing}/meta.json: no bucket '{missing[5:].split('/')[0]}' at "
            f"{storage.endpoint()}; expected an existing bucket"
        )
    with LocalS3Server(enforce_auth=True) as guarded:  # knows no account: every key is refused
        for key, value in guarded.environment.items():
            monkeypatch.setenv(key, value)
        url = f"s3://{bucket}/tiny"
        args = [*fault_overrides(url, tmp_path), f"hydra.run.dir={tmp_path / 'r'}"]
        code, _, err = invoke_main(train_command.main, "ditlab.train", args, monkeypatch, capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ditlab.train: error: {url}/meta.json: {guarded.endpoint} refused the credentials")
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists()  # no run dir left behind


class _Body:
    """The raw body botocore reads a response from."""

    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


SLOW_DOWN = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>busy</Message></Error>"


def test_transient_failures_are_retried_with_backoff_up_to_aws_max_attempts(bucket, s3_server, monkeypatch):
    """The server answers 503 SlowDown to the first GETs (botocore's own hook, ahead of the network):
    fewer failures than AWS_MAX_ATTEMPTS are absorbed by the retries; as many are one line."""
    from botocore.awsrequest import AWSResponse

    s3_server.client().put_object(Bucket=bucket, Key="tiny/meta.json", Body=b"{}")
    url = f"s3://{bucket}/tiny/meta.json"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    sent, failing = [], {"count": 0}

    def flaky(request, **_):
        sent.append(request.url)
        if len(sent) <= failing["count"]:
            return AWSResponse(request.url, 503, {}, _Body(SLOW_DOWN))
        return None  # send it

    events = storage.client().meta.events
    events.register("before-send.s3.GetObject", flaky)
    try:
        failing["count"] = 2
        assert storage.read_bytes(url) == b"{}" and len(sent) == 3
        sent.clear()
        failing["count"] = 3
        with pytest.raises(storage.StoreUnavailable) as lost:
            storage.read_bytes(url)
    finally:
        events.unregister("before-send.s3.GetObject", flaky)
    assert len(sent) == 3
    assert str(lost.value).startswith(f"{url}: the object store at {s3_server.endpoint} did not answer after 3 ")
    assert "SlowDown" in str(lost.value) and "\n" not in str(lost.value)


def test_an_unreachable_store_is_one_line_naming_the_url(prepared, tmp_path, monkeypatch, capsys):
    """No server on the endpoint's port: every command stops before it starts, exit status 5."""
    down = LocalS3Server()  # a free port, never started
    for key, value in down.environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    url = "s3://ditlab-gone/tiny"
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    for main, prog, args in (
        (prepare_command.main, "ditlab.prepare", [f"data.prepared_dir={url}", f"hydra.run.dir={tmp_path / 'p'}"]),
        (train_command.main, "ditlab.train", [*fault_overrides(url, tmp_path), f"hydra.run.dir={tmp_path / 't'}"]),
        (evaluate_command.main, "ditlab.evaluate", [f"samples={samples}", f"reference={url}", "extractor=clf"]),
    ):
        code, _, err = invoke_main(main, prog, args, monkeypatch, capsys)
        last = err.strip().splitlines()[-1]
        assert code == storage.StoreUnavailable.exit_code, err
        assert last.startswith(f"{prog}: error: {url}/meta.json: the object store at {down.endpoint} did not answer")
        assert "after 2 attempts" in last
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()


@pytest.mark.slow  # two prepare processes (~20 s on 2 cores): make test-slow, with the other multi-node tests
def test_two_nodes_without_a_shared_filesystem_prepare_one_dir_in_the_store(s3_server, bucket, tmp_path):
    """Two "nodes" (rank 0 and 1 of 2, each with its own cache dir) prepare one dir in the store: rank 0
    trains the small VAE and hands it over through the store, each rank uploads its own shards, rank 0
    merges the indexes from the store and writes meta.json last; nothing of the exchange is left. The
    split holds what one process writes with that VAE: rank 0's images (every other one), then rank 1's."""
    folder = make_image_folder(tmp_path / "images", per_class=8, size=(16, 16), corrupt=False)
    url = f"s3://{bucket}/two_nodes"
    args = folder_overrides(folder, url, 16, vae=None, extra=[*SMALL_KL, "encode.batch_size=8"])
    nodes = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        env = cli_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", DITLAB_CACHE=str(node / "cache"))
        argv = [sys.executable, "-m", "ditlab.prepare", *args, f"hydra.run.dir={node / 'run'}"]
        log = (tmp_path / f"node{rank}.log").open("w")
        nodes.append(subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
    assert [node.wait(timeout=300) for node in nodes] == [0, 0], (tmp_path / "node1.log").read_text()[-3000:]

    held = store_files(s3_server, bucket, "two_nodes")
    names = sorted(held)
    assert "meta.json" in names and "vae/ditlab_vae.json" in names
    assert not [n for n in names if n.endswith(".index.json") or n.startswith(".rank_counts")]  # the exchange
    assert not [p for r in (0, 1) for p in (tmp_path / f"node{r}" / "cache" / "staging").glob("*/*/*")]  # cleaned up
    meta = json.loads(held["meta.json"])
    assert meta["splits"]["train"]["count"] + meta["splits"]["val"]["count"] == 24
    train_chunks = [c["filename"] for c in json.loads(held["train/index.json"])["chunks"]]
    assert {name.split("-")[1] for name in train_chunks} == {"0", "1"}  # both ranks' chunks
    assert all(f"train/{c}" in held for c in train_chunks)

    # one process, with that VAE (copied where prepare finds its cached VAE), into a local dir
    local = tmp_path / "one_process"
    storage.download(storage.join(url, "vae"), local / "vae")
    prepare_from_config(compose_cfg("prepare", folder_overrides(folder, local, 16, vae=None, extra=SMALL_KL)))
    for split in ("train", "val"):
        ours, one = _latents(url, split, tmp_path / "read"), _latents(local, split, None)
        n0 = (len(one) + 1) // 2  # rank 0 encoded items 0, 2, 4, ...: its chunks come first
        reordered = [one[i] for i in range(0, len(one), 2)] + [one[i] for i in range(1, len(one), 2)]
        assert len(ours) == len(one) and n0 > 0
        for (latent, label), (expected, expected_label) in zip(ours, reordered):
            assert label == expected_label
            np.testing.assert_allclose(latent, expected, rtol=1e-2, atol=1e-3)


def _latents(prepared, split: str, cache) -> list[tuple[np.ndarray, int]]:
    from litdata import StreamingDataset

    location = storage.join(prepared, split) if storage.is_remote(prepared) else str(prepared / split)
    if storage.is_remote(prepared):
        storage.stream_s3_with_ditlab()
    data = StreamingDataset(location, cache_dir=str(cache) if cache else None)
    return [(np.asarray(data[i]["latent"], dtype=np.float32), int(data[i]["label"])) for i in range(len(data))]


def test_spawned_loader_workers_read_the_store_as_forked_ones(prepared, bucket, tmp_path):
    """A spawned worker starts a fresh interpreter: it fetches through ditlab's downloader too (litdata's
    own refuses the plain-http server), and hands out the batches a forked worker reads from local disk."""
    from ditlab.data.datamodule import LatentDataModule

    url = f"s3://{bucket}/tiny"
    publish(prepared, url)

    def batches(path, context):
        dm = LatentDataModule(path, batch_size=8, num_workers=1, multiprocessing_context=context)
        return [(b["latent"].clone(), b["label"].clone()) for b in dm.train_dataloader()]

    spawned, forked = batches(url, "spawn"), batches(str(prepared), "fork")
    assert len(spawned) == len(forked) > 0
    for (latent, label), (expected, expected_label) in zip(spawned, forked):
        assert torch.equal(latent, expected) and torch.equal(label, expected_label)


def test_later_epochs_read_the_cache_each_chunk_fetched_once_and_decoded_whole(bucket, tmp_path, monkeypatch):
    """Issue 31: two workers, two epochs through one persistent loader. Each chunk is fetched once (the
    cache keeps it; the chunk both workers' slices share is fetched by one of them), and a remote split is
    decoded a whole chunk at a time: litdata does not memory-map a shared chunk, and its windowed decoding
    re-read the whole file per window (later epochs fell to first-epoch speed)."""
    from ditlab.data.datamodule import LatentDataModule
    from ditlab.data.shards import ShardWriter

    local = tmp_path / "local"
    writer = ShardWriter(local / "train", chunk_bytes="8KB")  # ~7 items a chunk
    block = np.random.default_rng(0).standard_normal((2, 2, 4, 8, 8)).astype(np.float16)  # 1 KB
    for i in range(96):
        writer.add(block, i % 10)
    writer.finish()
    meta = {"num_classes": 10, "latent_shape": [4, 8, 8], "vae": {"kind": "identity", "scale_factor": 0.5}}
    PreparedDir(local).write_meta({**meta, "splits": {"train": {"count": 96}}})
    url = f"s3://{bucket}/chunks"
    publish(local, url)
    log, real = tmp_path / "fetched.txt", storage.download_file

    def counted(remote, path):  # the workers are forked: they append to one file
        with log.open("a") as f:
            f.write(remote + "\n")
        real(remote, path)

    monkeypatch.setattr(storage, "download_file", counted)
    dm = LatentDataModule(url, batch_size=4, num_workers=2, pin_memory=False)
    loader = dm.train_dataloader()
    sizes = [sum(len(batch["label"]) for batch in loader) for _epoch in range(2)]

    assert sizes[0] == sizes[1] > 0
    chunks = [c["filename"] for c in json.loads((local / "train" / "index.json").read_text())["chunks"]]
    fetched = [line.rsplit("/", 1)[-1] for line in log.read_text().split() if "/train/chunk-" in line]
    assert len(chunks) > 4 and sorted(fetched) == sorted(chunks)
    assert dm.train_set.batch_decode == "chunk"
