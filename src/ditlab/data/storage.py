"""Prepared data in an S3-protocol object store (``data.prepared_dir=s3://bucket/prefix``).

The endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ...), read by boto3 itself.
Every request is retried by botocore's ``standard`` mode (exponential backoff with jitter) up to
``AWS_MAX_ATTEMPTS`` attempts (``DEFAULT_MAX_ATTEMPTS`` when unset); what still fails becomes one line
naming the URL: ``StorageError`` (a missing bucket, refused credentials) or ``StoreUnavailable``
(the store did not answer).

Writes never show half a result: an object appears whole or not at all (one PUT), so writers order
their uploads and make the marker of "finished" the last one (a split's ``index.json``, a prepared
dir's ``meta.json``). Reads go through a local cache (``cache_root()``, ``$DITLAB_CACHE`` or
``<$DITLAB_ROOT>/cache``): small files are copied once per version of the prepared dir, and
training's shards stream through litdata into its own cache.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from filelock import FileLock

SCHEME = "s3://"
DEFAULT_MAX_ATTEMPTS = 10  # botocore's own default (3) gives up within a few seconds of a network blip
DESCRIPTOR_SUFFIX = ".json"  # a folder's descriptor files go up after its payload (they mark it complete)
REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}


class StorageError(ValueError):
    """The object store refused a request (a missing bucket, bad credentials): one line naming the URL."""

    exit_code = 2


class StoreUnavailable(StorageError):
    """The object store did not answer, after every retry: one line naming the URL."""

    exit_code = 5


def is_remote(location) -> bool:
    return str(location).startswith(SCHEME)


def join(location: str, *names: str) -> str:
    """``location`` (a URL) / ``names``, with single slashes."""
    return "/".join([str(location).rstrip("/"), *(n.strip("/") for n in names if n)])


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (``bucket``, ``some/key``)."""
    bucket, _, key = str(url)[len(SCHEME) :].partition("/")
    if not is_remote(url) or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"{url!r} is not an object-store location; expected s3://<bucket>/<prefix>")
    return bucket, key.strip("/")


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def max_attempts() -> int:
    value = os.environ.get("AWS_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"AWS_MAX_ATTEMPTS={value!r}; expected a whole number >= 1")
    return int(value)


def cache_root() -> Path:
    """Where remote prepared dirs are cached and staged on this machine (as ``paths.root_dir`` defaults)."""
    return Path(os.environ.get("DITLAB_CACHE") or Path(os.environ.get("DITLAB_ROOT", ".")) / "cache")


def client():
    """A boto3 S3 client for this process (clients are thread-safe, not fork-safe) and this environment."""
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return _client(os.getpid(), environment)


@lru_cache(maxsize=4)
def _client(pid: int, environment: tuple):
    import boto3
    from botocore.config import Config

    retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard"), "total_max_attempts": max_attempts()}
    return boto3.session.Session().client("s3", config=Config(retries=retries))


# ---------------------------------------------------------------- one line per failure
def failure(err: Exception, url: str) -> Exception:
    """The one-line error that ``err``, raised by a request for ``url``, means to a user."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{url}: no usable AWS credentials ({err}); expected AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", "?"))
        if code == "NoSuchBucket":
            bucket = split_url(url)[0]
            return StorageError(f"{url}: no bucket {bucket!r} at {endpoint()}; expected an existing bucket")
        if code in ("NoSuchKey", "404"):
            return FileNotFoundError(f"{url} does not exist")
        if code in REFUSED:
            return StorageError(
                f"{url}: {endpoint()} refused the credentials ({code}); expected AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY of an account that may use this bucket"
            )
    reason = " ".join(str(err).split()) or type(err).__name__
    return StoreUnavailable(
        f"{url}: the object store at {endpoint()} did not answer after {max_attempts()} attempts with backoff "
        f"({reason}); expected it reachable (a run that stopped here resumes with ckpt_path=last)"
    )


@contextmanager
def requests_for(url: str):
    """Turn whatever boto3 raises inside the block into ``failure(err, url)``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as err:
        raise failure(err, url) from err


def named_store_failure(err: BaseException) -> StorageError | None:
    """The StorageError inside ``err``: litdata and DataLoader workers re-raise a download's error as a
    RuntimeError that carries it as its cause (same process) or as text (a worker's traceback)."""
    seen = err
    while seen is not None:
        if isinstance(seen, StorageError):
            return type(seen)(str(seen))
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"\b(StoreUnavailable|StorageError): (s3://.+)", str(err))
    if found is None:
        return None
    return (StoreUnavailable if found.group(1) == "StoreUnavailable" else StorageError)(found.group(2).strip())


# ---------------------------------------------------------------- objects
def stat(url: str) -> dict | None:
    """``{"size", "etag", "modified"}`` of the object at ``url``; None when there is none (the bucket
    must exist: a missing bucket is an error, not an absent object)."""
    bucket, key = split_url(url)
    try:
        with requests_for(url):
            head = client().head_object(Bucket=bucket, Key=key)
    except FileNotFoundError:
        check_bucket(url)  # HEAD answers a missing bucket with a bare 404, as a missing object
        return None
    except StorageError as err:
        if type(err) is StorageError:
            check_bucket(url)  # a bare 403 too: the listing names the reason
        raise
    return {"size": head["ContentLength"], "etag": head["ETag"].strip('"'), "modified": str(head["LastModified"])}


def check_bucket(url: str) -> None:
    """Raise the one-line error of a missing or refused bucket (what a bare HEAD status cannot say)."""
    bucket, key = split_url(url)
    with requests_for(url):
        client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)


def read_bytes(url: str) -> bytes | None:
    """The object at ``url``; None when there is none."""
    bucket, key = split_url(url)
    try:
        with requests_for(url):
            return client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except FileNotFoundError:
        return None


def list_objects(url: str) -> dict[str, int]:
    """{name relative to ``url``: size} of the objects under the folder ``url`` (or the object itself: "")."""
    bucket, key = split_url(url)
    found = {}
    with requests_for(url):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                name = obj["Key"]
                if name == key:
                    found[""] = obj["Size"]
                elif name.startswith(key + "/") or not key:
                    found[name[len(key) :].lstrip("/")] = obj["Size"]
    return found


def upload_file(path: Path, url: str) -> None:
    bucket, key = split_url(url)
    with requests_for(url):
        client().upload_file(str(path), bucket, key)


def write_bytes(url: str, data: bytes) -> None:
    """Put ``data`` at ``url`` (one PUT: the object appears whole)."""
    bucket, key = split_url(url)
    with requests_for(url):
        client().put_object(Bucket=bucket, Key=key, Body=data)


def delete(url: str) -> None:
    """Remove the object at ``url`` (nothing there: nothing to do)."""
    bucket, key = split_url(url)
    with requests_for(url):
        client().delete_object(Bucket=bucket, Key=key)


def download_file(url: str, path: Path) -> None:
    """Copy the object at ``url`` to ``path`` (a temporary beside it, renamed: never half a file)."""
    bucket, key = split_url(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with requests_for(url):
            client().download_file(bucket, key, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- folders
def is_temporary(name: str) -> bool:
    """Work in progress that is never uploaded: ditlab's temporaries and litdata's staging folders."""
    return name.startswith(".") or name.endswith((".tmp", ".lock"))


def upload_order(local_dir: Path) -> list[Path]:
    """The finished files under ``local_dir``, payload before descriptors (``*.json``) in every folder,
    so that a folder's descriptor (a split's index.json, the VAE's ditlab_vae.json) is there only once
    everything it describes is."""
    files = []
    for root, dirs, names in os.walk(local_dir):
        dirs[:] = sorted(d for d in dirs if not is_temporary(d))
        kept = sorted(n for n in names if not is_temporary(n))
        files += [Path(root) / n for n in kept if not n.endswith(DESCRIPTOR_SUFFIX)]
        files += [Path(root) / n for n in kept if n.endswith(DESCRIPTOR_SUFFIX)]
    return files


def upload(path: Path, url: str, only_missing: bool = False) -> None:
    """Upload a file, or a folder's finished files in ``upload_order``, to ``url``; ``only_missing``:
    leave out the files the store already holds with the same size (uploaded earlier, e.g. by the
    rank that wrote them)."""
    if path.is_file():
        if not (only_missing and list_objects(url).get("") == path.stat().st_size):
            upload_file(path, url)
        return
    held = list_objects(url) if only_missing else {}
    for f in upload_order(path):
        name = f.relative_to(path).as_posix()
        if held.get(name) != f.stat().st_size:
            upload_file(f, join(url, name))


def download(url: str, path: Path) -> bool:
    """Copy the object or folder at ``url`` to ``path``, skipping files already there; False when the
    store holds nothing at ``url``."""
    objects = list_objects(url)
    for name in objects:
        target = path / name if name else path
        if not target.is_file():
            download_file(join(url, name), target)
    return bool(objects)


def version(url: str) -> str | None:
    """A short name for the current version of the object at ``url`` (None: there is none)."""
    info = stat(url)
    if info is None:
        return None
    return hashlib.sha1(f"{info['etag']} {info['modified']}".encode()).hexdigest()[:16]


def local_folder(kind: str, url: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/<kind>/<bucket>/<key>``: where ``url``'s ``kind`` (staging, prepared, files) lives here."""
    bucket, key = split_url(url)
    return Path(cache_dir or cache_root()) / kind / bucket / key


def fetched(url: str, cache_dir: str | Path | None = None) -> Path:
    """A local copy of the single object at ``url`` (kept per version: a changed object is fetched again)."""
    current = version(url)
    if current is None:
        raise FileNotFoundError(f"{url} does not exist")
    path = local_folder("files", url, cache_dir) / current / url.rsplit("/", 1)[-1]
    if not path.is_file():
        download_file(url, path)
    return path


# ---------------------------------------------------------------- litdata streaming
def stream_s3_with_ditlab() -> None:
    """Make litdata fetch ``s3://`` chunks with ``ChunkDownloader`` (litdata's public downloader registry).

    litdata's own S3 path fetches chunks through obstore, which refuses plain-http endpoints (a local
    MinIO or test server) and retries a lost server for hours through boto3's 1000 attempts; this one
    fetches with the client above: the standard AWS environment, bounded retries with backoff, and
    one line naming the URL when they run out."""
    from litdata.streaming.downloader import register_downloader

    register_downloader(SCHEME, _chunk_downloader_class(), overwrite=True)


def stream_s3_in_worker(_worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: ``stream_s3_with_ditlab`` in the worker itself. A
    forked worker inherits the registration; a spawned one (``multiprocessing_context=spawn``) starts a
    fresh interpreter, whose litdata would fetch with its own S3 downloader."""
    stream_s3_with_ditlab()


@lru_cache(maxsize=1)
def _chunk_downloader_class():
    from litdata.streaming.downloader import Downloader

    class ChunkDownloader(Downloader):
        """litdata's chunk and index fetches of an ``s3://`` dataset, through ``download_file``."""

        def __init__(self, remote_dir, cache_dir, chunks, storage_options=None, **_session_options):
            super().__init__(remote_dir, cache_dir, chunks, storage_options)

        def download_file(self, remote_filepath: str, local_filepath: str) -> None:
            if os.path.exists(local_filepath):
                return
            # The chunk at the boundary of two workers' slices is asked for by both: the second waits
            # for the first's copy instead of fetching it again (litdata's own S3 downloader takes the
            # same lock file; its force-download defers to whoever holds it).
            Path(local_filepath).parent.mkdir(parents=True, exist_ok=True)
            with FileLock(local_filepath + ".lock"):
                if not os.path.exists(local_filepath):
                    download_file(remote_filepath, Path(local_filepath))

    return ChunkDownloader
