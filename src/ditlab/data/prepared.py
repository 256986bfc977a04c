"""A prepared dataset's folder, its files named in one place, on a local disk or in an object store
(``s3://bucket/prefix``, ``ditlab.data.storage``).

<root>/
  meta.json                 dataset, classes, counts, latent shape/format/dtype, views, VAE and scale factor
  train/ val/               latent shards (``ditlab.data.shards``)
  vae/                      the small VAE prepare trained (``ditlab.pipelines.fit_vae``: weights and its recipe)
  classifier/               the dataset classifier behind the offline fid_clf (safetensors + classifier.json)
  reference_<extractor>.npz FID reference statistics of real images (``ditlab.metrics.reference``)

A remote dir is written through a local staging folder: prepare writes there as it would write a
local dir, then ``write_meta`` uploads every finished file and meta.json last, so that the store
holds meta.json only once everything it describes is there (an interrupted prepare leaves no
meta.json, and its rerun resumes from the staging folder). Several ranks each have a staging
folder of their own (nodes need not share a filesystem) and meet in the store: ``take_shared``.
Reading a remote dir, the small files (vae/, classifier/, reference statistics) are copied into a
local folder per version of meta.json (a dir prepared again is never read from an old copy); the
shards stream through litdata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ditlab.data import storage
from ditlab.runtime.files import atomic_path, write_json

META_KEYS = ("num_classes", "latent_shape", "vae")


class PreparedDir:
    """``root``: a local folder or an ``s3://bucket/prefix`` URL. ``cache_dir``: where a remote dir is
    staged and cached on this machine (default ``storage.cache_root()``)."""

    META = "meta.json"
    CLASSIFIER = "classifier"
    VAE = "vae"

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None):
        self.remote = storage.is_remote(root)
        if self.remote:
            storage.split_url(root)  # a malformed URL fails here, before any request
        self.root = str(root).rstrip("/") if self.remote else Path(root)
        self.cache_dir = cache_dir

    def __repr__(self) -> str:
        return f"PreparedDir({str(self.root)!r})"

    def location(self, name: str) -> str:
        """Where ``name`` is, as a user would write it: a local path or a URL."""
        return storage.join(self.root, name) if self.remote else str(self.root / name)

    # ------------------------------------------------------------ the files, on this machine
    @property
    def local(self) -> Path:
        """The folder on this machine holding this dir's files (a remote dir: see the module doc)."""
        return self._local()[0]

    def _local(self) -> tuple[Path, bool]:
        """(the local folder, whether it is a copy of a prepared remote dir rather than its staging)."""
        if not self.remote:
            return self.root, False
        current = storage.version(self.location(self.META))
        if current is None:
            return storage.local_folder("staging", self.root, self.cache_dir), False
        return storage.local_folder("prepared", self.root, self.cache_dir) / current, True

    def _here(self, name: str) -> Path:
        """``name`` on this machine; of a prepared remote dir, copied from the store when it holds it."""
        folder, copy_of_store = self._local()
        if copy_of_store:
            storage.download(self.location(name), folder / name)
        return folder / name

    @property
    def meta_path(self) -> Path:
        return self.local / self.META

    def split(self, name: str) -> Path:
        """Where prepare writes the split ``name`` (a remote dir's: in its staging folder)."""
        return self.local / name

    def reference(self, extractor: str) -> Path:
        return self._here(f"reference_{extractor}.npz")

    @property
    def classifier(self) -> Path:
        return self._here(self.CLASSIFIER)

    @property
    def vae(self) -> Path:
        return self._here(self.VAE)

    # ------------------------------------------------------------ meta.json: its presence means "prepared"
    def is_prepared(self) -> bool:
        if self.remote:
            return storage.stat(self.location(self.META)) is not None
        return self.meta_path.is_file()

    def read_meta(self) -> dict:
        where = self.location(self.META)
        data = storage.read_bytes(where) if self.remote else self._read_local(self.meta_path)
        if data is None:
            raise FileNotFoundError(
                f"no prepared dataset at {str(self.root)!r} (missing {self.META}); run "
                "'python -m ditlab.prepare data=<dataset> vae=<vae>' first"
            )
        try:
            meta = json.loads(data.decode())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{where} is not valid JSON ({err}); expected the {self.META} written by ditlab.prepare"
            ) from err
        missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else ["*"]
        if missing:
            raise ValueError(f"{where} lacks {missing[0]!r}; expected the {self.META} written by ditlab.prepare")
        return meta

    def check_vae_matches(self, vae_name: str, recipe=None, codec_path: str | None = None, meta=None) -> None:
        """The latents here were made with the VAE a config names (else decoding them is garbage):
        its name, the small VAE's ``recipe`` (``check_cached`` against the one in ``vae/``) and a
        pretrained VAE's ``codec_path``. ``meta``: this dir's meta.json, when already read."""
        stored = (self.read_meta() if meta is None else meta).get("vae", {})
        if "name" in stored and stored["name"] != vae_name:
            raise ValueError(
                f"vae={vae_name} but {self.root} was prepared with vae={stored['name']}; "
                f"expected vae={stored['name']} (or another data.prepared_dir)"
            )
        if recipe is not None:
            recipe.check_cached(self.vae)
        if codec_path and stored.get("path") and stored["path"] != codec_path:
            raise ValueError(
                f"vae.codec.path={codec_path} but {self.root} was encoded with {stored['path']}; expected the same VAE"
            )

    @staticmethod
    def _read_local(path: Path) -> bytes | None:
        return path.read_bytes() if path.is_file() else None

    def write_meta(self, meta: dict) -> None:
        """Write meta.json, the last step of prepare; a remote dir's staged files are uploaded first."""
        if not self.remote:
            write_json(self.meta_path, meta)
            return
        staging = self.staging
        write_json(staging / self.META, self._as_stored(meta, staging))
        for entry in sorted(staging.iterdir()):
            if entry.name != self.META and not storage.is_temporary(entry.name):
                storage.upload(entry, self.location(entry.name), only_missing=True)  # not what ranks put there
        storage.upload_file(staging / self.META, self.location(self.META))
        self.forget_staging()  # the store has it all now; reads use a copy per version of meta.json

    @property
    def staging(self) -> Path:
        """A remote dir's staging folder on this machine (under the cache dir), where prepare writes."""
        return storage.local_folder("staging", self.root, self.cache_dir)

    def forget_staging(self) -> None:
        if self.remote:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _as_stored(self, meta: dict, staging: Path) -> dict:
        """meta.json as the store keeps it: the small VAE's folder named by its URL, not the staging
        folder it was written in (removed once uploaded)."""
        vae = meta.get("vae", {})
        if vae.get("path") != str(staging / self.VAE):
            return meta
        return {**meta, "vae": {**vae, "path": self.location(self.VAE)}}

    def upload(self, name: str) -> None:
        """Put the file or folder ``name``, just written on this machine, into a remote dir's store
        (a local dir: nothing to do). For what is written after meta.json, e.g. new reference statistics,
        and for what one rank of prepare hands to the others (the small VAE)."""
        if self.remote:
            storage.upload(self.local / name, self.location(name))

    def take_shared(self, name: str) -> bool:
        """Whether the folder ``name`` that another rank writes is here yet. A remote dir's is copied
        from the store once it is there whole (its ``.json`` descriptors go up last): ranks on nodes
        without a shared filesystem meet in the store."""
        here = self.local / name
        if here.is_dir() or not self.remote:
            return here.is_dir()
        held = storage.list_objects(self.location(name))
        if not any(n.endswith(storage.DESCRIPTOR_SUFFIX) for n in held):
            return False
        with atomic_path(here) as tmp:
            storage.download(self.location(name), tmp)
        return True


def reference_source(reference: str | Path) -> tuple[PreparedDir, str | None]:
    """``ditlab.evaluate reference=``: a prepared dir (local or remote: its own statistics, judged by its
    classifier) or a statistics file in one -> (the prepared dir, the statistics file on this machine or None)."""
    if storage.is_remote(reference):
        url = str(reference).rstrip("/")
        if url.endswith(".npz"):
            return PreparedDir(url.rsplit("/", 1)[0]), str(storage.fetched(url))
        return PreparedDir(url), None
    reference = Path(reference)
    if reference.is_dir():
        return PreparedDir(reference), None
    return PreparedDir(reference.parent), str(reference)
