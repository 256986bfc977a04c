"""The object-store plumbing that needs no server: URLs, the one-line errors, the upload order, and
PreparedDir naming local and remote files."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from ditlab.data import storage
from ditlab.data.prepared import PreparedDir, reference_source


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "..."}}, "GetObject")


def test_urls_join_and_split():
    assert storage.join("s3://bucket/prefix/", "train", "index.json") == "s3://bucket/prefix/train/index.json"
    assert storage.split_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert storage.split_url("s3://bucket") == ("bucket", "")
    for bad in ("s3://Bad_Bucket/x", "s3://b/x", "/local/dir"):
        with pytest.raises(ValueError, match="expected s3://<bucket>/<prefix>"):
            storage.split_url(bad)


def test_retry_budget_comes_from_the_aws_environment(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    assert storage.max_attempts() == storage.DEFAULT_MAX_ATTEMPTS
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert storage.max_attempts() == 3
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS='many'; expected a whole number"):
        storage.max_attempts()


def test_each_failure_is_one_line_naming_the_url(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    url = "s3://bucket/tiny/meta.json"
    missing = storage.failure(client_error("NoSuchBucket"), url)
    assert type(missing) is storage.StorageError
    assert str(missing) == f"{url}: no bucket 'bucket' at http://127.0.0.1:9; expected an existing bucket"
    refused = storage.failure(client_error("InvalidAccessKeyId"), url)
    assert type(refused) is storage.StorageError and "refused the credentials (InvalidAccessKeyId)" in str(refused)
    assert isinstance(storage.failure(client_error("NoSuchKey"), url), FileNotFoundError)
    lost = storage.failure(EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket"), url)
    assert type(lost) is storage.StoreUnavailable and lost.exit_code != missing.exit_code
    assert str(lost).startswith(f"{url}: the object store at http://127.0.0.1:9 did not answer after 4 attempts")
    for err in (missing, refused, lost):
        assert "\n" not in str(err)


def test_a_download_failure_is_found_inside_what_litdata_and_workers_raise():
    lost = storage.StoreUnavailable("s3://b-1/p/train/chunk-0-3.bin: the object store did not answer")
    try:
        try:
            raise lost
        except storage.StoreUnavailable as err:
            raise RuntimeError("Chunk prefetch thread crashed") from err
    except RuntimeError as wrapped:  # litdata's reader, in this process
        found = storage.named_store_failure(wrapped)
    assert type(found) is storage.StoreUnavailable and str(found) == str(lost)
    worker = RuntimeError(  # a DataLoader worker's: the original only as text
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "reader.py", line 1\nRuntimeError: Chunk prefetch thread crashed while waiting for /c/chunk-0-3.bin. '
        f"Original error: StoreUnavailable: {lost}\n"
    )
    found = storage.named_store_failure(worker)
    assert type(found) is storage.StoreUnavailable and str(found) == str(lost)
    assert storage.named_store_failure(RuntimeError("something else")) is None


def test_uploads_skip_work_in_progress_and_put_descriptors_last(tmp_path):
    for name in ("train/chunk-0-0.bin", "train/index.json", "train/chunk-0-1.bin", "vae/ditlab_vae.json",
                 "vae/model.safetensors", "val.tmp/chunk-0-0.bin", ".meta.json.tmp-12", "reference_clf.npz",
                 "train/chunk-0-0.bin.lock"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    order = [p.relative_to(tmp_path).as_posix() for p in storage.upload_order(tmp_path)]
    assert order == [
        "reference_clf.npz",
        "train/chunk-0-0.bin",
        "train/chunk-0-1.bin",
        "train/index.json",
        "vae/model.safetensors",
        "vae/ditlab_vae.json",
    ]


def test_prepared_dir_names_local_files_as_before_and_remote_ones_by_url(tmp_path):
    local = PreparedDir(tmp_path / "latents")
    assert not local.remote and local.local == tmp_path / "latents"
    assert local.vae == tmp_path / "latents" / "vae"
    assert local.reference("clf") == tmp_path / "latents" / "reference_clf.npz"
    assert local.location("meta.json") == str(tmp_path / "latents" / "meta.json")
    remote = PreparedDir("s3://bucket/tiny/")
    assert remote.remote and remote.root == "s3://bucket/tiny"
    assert remote.location("train") == "s3://bucket/tiny/train" and repr(remote) == "PreparedDir('s3://bucket/tiny')"
    with pytest.raises(ValueError, match="'s3://No_Such/x' is not an object-store location"):
        PreparedDir("s3://No_Such/x")


def test_cache_root_follows_ditlab_cache_then_ditlab_root(monkeypatch, tmp_path):
    monkeypatch.delenv("DITLAB_CACHE", raising=False)
    monkeypatch.setenv("DITLAB_ROOT", str(tmp_path))
    assert storage.cache_root() == tmp_path / "cache"
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "elsewhere"))
    assert storage.cache_root() == tmp_path / "elsewhere"
    assert storage.local_folder("staging", "s3://bucket/a/b") == tmp_path / "elsewhere" / "staging" / "bucket" / "a/b"


def test_evaluate_reference_local_dir_or_file(tmp_path):
    (tmp_path / "latents").mkdir()
    prepared, stats = reference_source(tmp_path / "latents")
    assert prepared.root == tmp_path / "latents" and stats is None
    prepared, stats = reference_source(str(tmp_path / "latents" / "reference_clf.npz"))
    assert prepared.root == tmp_path / "latents" and stats == str(tmp_path / "latents" / "reference_clf.npz")
    assert isinstance(prepared.root, Path)
