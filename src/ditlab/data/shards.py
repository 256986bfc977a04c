"""The shard format of a prepared split (``ditlab.data.prepared`` names the rest of the folder):

    <split>/              litdata shards (index.json + chunk-<rank>-<i>.bin), one item per image:
                            latent (V, M, C, H, W) float16: [image, its horizontal flip] (V = 2)
                                   or [image] (V = 1, data.flip=false) x
                                   [posterior mean, posterior std] (M = 2) or [sample] (M = 1)
                            label  int
                            image  uint8 (C, H, W), only with data.store_images: the preprocessed image

litdata's format streams from an object store as from a local disk (``ditlab.data.storage``): a
prepared dir at ``s3://bucket/prefix`` is written here first, then uploaded, index.json last (with
several ranks, each uploads its own chunks: ``ShardWriter``).
A split is written into ``<split>.tmp`` and renamed once every rank finished, so an interrupted
run leaves nothing that a later run would mistake for finished work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ditlab.data import storage
from ditlab.runtime.files import publish
from ditlab.runtime.processes import wait_until

INDEX_FILE = "index.json"


def stored_views(meta: dict) -> int:
    """Latent views per item: 2 (image + flip), or 1 (data.flip=false); metas from before the key: 2."""
    return meta.get("views", 2)


def split_is_complete(split_dir: Path) -> bool:
    return (split_dir / INDEX_FILE).is_file()


def count_items(split_dir: Path) -> int:
    index = json.loads((split_dir / INDEX_FILE).read_text())
    return sum(chunk["chunk_size"] for chunk in index["chunks"])


def check_split(split_dir: str | Path, meta: dict, cache_dir: str | Path | None = None) -> None:
    """A split's shards are complete and hold what meta.json says: every chunk file has the size its
    index records (a truncated shard otherwise surfaces as a litdata timeout, many lines deep), and
    the first item is a float16 latent block (V, M, C, H, W) of meta's views and latent shape.
    ``split_dir`` may be a URL (``ditlab.data.storage``); ``cache_dir`` is then where litdata caches
    the chunk that holds the first item (training's cache: the chunk is not fetched twice)."""
    chunks, sizes = _chunks_and_sizes(split_dir)
    for chunk in chunks:
        size = sizes.get(chunk["filename"])
        if size != chunk["chunk_bytes"]:
            raise ValueError(
                f"shard {_join(split_dir, chunk['filename'])} is {'missing' if size is None else f'{size} bytes'}; "
                f"expected {chunk['chunk_bytes']} bytes (truncated: delete the prepared dir and rerun ditlab.prepare)"
            )
    from litdata import StreamingDataset

    if storage.is_remote(split_dir):
        storage.stream_s3_with_ditlab()
    try:
        latent = np.asarray(StreamingDataset(str(split_dir), cache_dir=cache_dir)[0]["latent"])
    except Exception as err:  # noqa: BLE001 - an undecodable item is a bad shard, whatever litdata raises
        failure = storage.named_store_failure(err)
        if failure is not None:  # the store, not the shard
            raise failure from err
        raise ValueError(
            f"the first item of {split_dir} cannot be decoded ({err}); expected ditlab.prepare's shards"
        ) from err
    shape, views = tuple(meta["latent_shape"]), stored_views(meta)
    if (
        latent.dtype != np.dtype(meta.get("latent_dtype", "float16"))
        or latent.ndim != 5
        or latent.shape[2:] != shape
        or latent.shape[0] != views
    ):
        raise ValueError(
            f"latents in {split_dir} are {latent.dtype} {latent.shape}; expected {meta.get('latent_dtype', 'float16')} "
            f"({views}, M, {', '.join(map(str, shape))}) as meta.json says"
        )


def _join(split_dir: str | Path, name: str) -> str | Path:
    return storage.join(split_dir, name) if storage.is_remote(split_dir) else Path(split_dir) / name


def _chunks_and_sizes(split_dir: str | Path) -> tuple[list[dict], dict[str, int]]:
    """The chunks a split's index lists, and the size of every file the split holds."""
    index = _join(split_dir, INDEX_FILE)
    try:
        if storage.is_remote(split_dir):
            data = storage.read_bytes(index)
            if data is None:
                raise FileNotFoundError(f"{index} does not exist")
            chunks = json.loads(data)["chunks"]
        else:
            chunks = json.loads(index.read_text())["chunks"]
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, storage.StorageError):
            raise
        raise ValueError(f"{index} is unreadable ({err}); expected litdata's index") from err
    if storage.is_remote(split_dir):
        return chunks, storage.list_objects(split_dir)
    files = [Path(split_dir) / c["filename"] for c in chunks]
    return chunks, {f.name: f.stat().st_size for f in files if f.is_file()}


class ShardWriter:
    """Writes one rank's share of a split into ``<split>.tmp``; ``finish`` on rank 0 waits for every
    rank's index, merges them and renames the directory into place.

    Chunk and index names carry the rank (litdata names them ``chunk-<rank>-<i>.bin`` and
    ``<rank>.index.json``), so ranks never write the same file. ``store_dir`` (the split's URL in an
    object store): the ranks meet there instead of in ``<split>.tmp``, so that nodes without a shared
    filesystem can write one split: each rank uploads its chunks, then its index (which says they
    are all there); rank 0 takes the other ranks' indexes from the store, merges them and uploads
    ``index.json`` (the split is complete in the store once it is there).
    """

    def __init__(
        self,
        split_dir: str | Path,
        rank: int = 0,
        world_size: int = 1,
        chunk_bytes: str = "64MB",
        store_dir: str | None = None,
    ):
        from litdata.streaming.writer import BinaryWriter

        self.split_dir = Path(split_dir)
        self.tmp_dir = self.split_dir.with_name(self.split_dir.name + ".tmp")
        self.rank, self.world_size = rank, world_size
        self.store_dir = store_dir.rstrip("/") if store_dir else None
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(self.tmp_dir.glob(f"chunk-{rank}-*")) + list(self.tmp_dir.glob(f"{rank}.index.json")):
            stale.unlink()  # left by an interrupted run of this rank
        if self.store_dir:
            storage.delete(storage.join(self.store_dir, _rank_index(rank)))
        # litdata reads the writer's rank from this variable (its data-optimizer convention).
        previous = os.environ.get("DATA_OPTIMIZER_GLOBAL_RANK")
        os.environ["DATA_OPTIMIZER_GLOBAL_RANK"] = str(rank)
        try:
            self.writer = BinaryWriter(str(self.tmp_dir), chunk_bytes=chunk_bytes)
            assert self.writer.rank == rank
        finally:
            if previous is None:
                os.environ.pop("DATA_OPTIMIZER_GLOBAL_RANK", None)
            else:
                os.environ["DATA_OPTIMIZER_GLOBAL_RANK"] = previous
        self.count = 0

    def add(self, latent: np.ndarray, label: int, image: np.ndarray | None = None) -> None:
        """One item: its latent block, its label and, when the split stores them, the clean image
        (uint8 (C, H, W), the view the latent's view 0 is: what representation alignment encodes)."""
        item = {"latent": latent, "label": int(label)}
        if image is not None:
            item["image"] = image
        # Global item index: rank-major is fine, litdata only needs it unique per writer.
        self.writer.add_item(self.count, item)
        self.count += 1

    def finish(self, timeout_s: float = 3600.0) -> None:
        self.writer.done()
        if self.store_dir:
            self._upload_own_share()
        if self.rank != 0:
            return
        expected = [_rank_index(r) for r in range(self.world_size)]
        wait_until(
            lambda: self._take_rank_indexes(expected),
            timeout_s,
            f"every rank's shards in {self.store_dir or self.tmp_dir}",
            poll_s=1.0 if self.store_dir else 0.5,
        )
        # litdata's merge of per-rank indexes into index.json (public merge() expects its own
        # process group; the ranks here may be separate jobs, hence the wait above).
        self.writer._merge_no_wait()
        publish(self.tmp_dir, self.split_dir)
        if self.store_dir:
            storage.upload_file(self.split_dir / INDEX_FILE, storage.join(self.store_dir, INDEX_FILE))
            for name in expected:
                storage.delete(storage.join(self.store_dir, name))

    def _upload_own_share(self) -> None:
        """This rank's chunks, then its index: the index in the store says that they are all there."""
        for chunk in sorted(self.tmp_dir.glob(f"chunk-{self.rank}-*.bin")):
            storage.upload_file(chunk, storage.join(self.store_dir, chunk.name))
        index = _rank_index(self.rank)
        storage.upload_file(self.tmp_dir / index, storage.join(self.store_dir, index))

    def _take_rank_indexes(self, expected: list[str]) -> bool:
        """Whether every rank's index is in ``<split>.tmp``; those in the store only are copied there."""
        missing = [name for name in expected if not (self.tmp_dir / name).exists()]
        if not missing or not self.store_dir:
            return not missing
        held = storage.list_objects(self.store_dir)
        if any(name not in held for name in missing):
            return False
        for name in missing:
            storage.download_file(storage.join(self.store_dir, name), self.tmp_dir / name)
        return True


def _rank_index(rank: int) -> str:
    return f"{rank}.index.json"  # litdata's name for one writer's index
