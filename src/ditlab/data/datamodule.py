"""LatentDataModule: streams prepared latent shards (litdata) into training batches.

Workers only move raw float16 blocks; the per-sample randomness (image or its flip, a draw from
the posterior) and the scale factor are applied per batch after it reaches the device, with a
generator of the "data" stream (seed, rank, step, stage) so that a resumed run draws exactly what
the original did, and never what the training step's own streams draw.

With gradient accumulation (``micro_batches`` K > 1) a training batch is the optimizer step's K
consecutive micro-batches of ``batch_size``: the loader hands them over as a list, each is drawn
from its own stream (seed, rank, step, micro-batch), and the model batch holds them one after
another (K * batch_size rows) for the training step to take apart.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import LightningDataModule

from ditlab.data import storage
from ditlab.data.prepared import PreparedDir
from ditlab.data.shards import check_split, stored_views
from ditlab.models.vae import to_model_space
from ditlab.seeding import stream_generator


def draw_views(block: torch.Tensor, generator: torch.Generator | None = None, flip: bool = True) -> torch.Tensor:
    """(N,) long: which stored view each sample of a (N, V, ...) block uses, 1 = the horizontal flip
    (drawn when ``flip`` and V = 2; else 0, the image)."""
    n, device = block.shape[0], block.device
    if flip and block.shape[1] == 2:
        return (torch.rand(n, generator=generator, device=device) < 0.5).long()
    return torch.zeros(n, dtype=torch.long, device=device)


def latents_from_block(
    block: torch.Tensor,
    scale_factor: float | dict,
    generator: torch.Generator | None = None,
    flip: bool = True,
    sample_posterior: bool = True,
    which: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, V, M, C, H, W) stored block -> (N, C, H, W) model-space latents.

    Picks the image or its flip per sample (``which``, drawn by ``draw_views`` when not given),
    draws z = mean + std * eps when the posterior (M = 2) was stored (or takes the mean when
    ``sample_posterior`` is off), then multiplies by the scale (``scale_factor`` a number), or maps it
    to model space by the codec's record (a dict: ``models.vae.to_model_space``, per-channel statistics).
    """
    n, device = block.shape[0], block.device
    which = draw_views(block, generator, flip) if which is None else which
    chosen = block[torch.arange(n, device=device), which].float()  # (N, M, C, H, W)
    z = chosen[:, 0]
    if chosen.shape[1] == 2 and sample_posterior:
        z = z + chosen[:, 1] * torch.randn(z.shape, generator=generator, device=device)
    if isinstance(scale_factor, dict):
        return to_model_space(z, scale_factor)
    return z * scale_factor


def images_of_views(images: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """The stored images (N, C, H, W) as the views ``which`` picked: flipped where it is 1."""
    return torch.where(which.view(-1, 1, 1, 1).bool(), images.flip(-1), images)


def check_model_fits(meta: dict, path: str, input_size: int, in_channels: int, patch_size: int, num_classes: int):
    """Fail when a model of this shape does not fit the data ``meta`` (meta.json of ``path``) describes."""
    c, h, w = meta["latent_shape"]
    if in_channels != c:
        raise ValueError(f"model.in_channels={in_channels} but the latents in {path} have {c} channels")
    if input_size != h or h != w:
        raise ValueError(f"model.input_size={input_size} but the latents in {path} are {h}x{w}")
    if h % patch_size != 0:
        raise ValueError(f"model.patch_size={patch_size} does not divide the latent size {h}")
    if num_classes != meta["num_classes"]:
        raise ValueError(f"model.num_classes={num_classes} but {path} has {meta['num_classes']} classes")


def _resumable_loader_class():
    from litdata import StreamingDataLoader

    class ResumableStreamingDataLoader(StreamingDataLoader):
        """StreamingDataLoader whose restored position applies to the first epoch after
        ``load_state_dict`` only.

        litdata clears its ``restore`` flag only when an epoch's generator runs to exhaustion;
        Lightning stops after ``len(loader)`` batches without exhausting it, so every later epoch
        replayed the restored epoch (seen as a resumed run diverging at its first epoch boundary).
        """

        _fresh_restore = False
        group = 1  # > 1: hand over lists of this many consecutive batches (the micro-batches of a step)

        def __len__(self):
            return super().__len__() // self.group

        def load_state_dict(self, obj):
            super().load_state_dict(obj)
            self._fresh_restore = True

        def __iter__(self):
            if self.restore and not self._fresh_restore:
                self.restore = False  # a restore already consumed by an earlier epoch
            self._fresh_restore = False
            batches = _naming_store_failures(super().__iter__())
            return batches if self.group == 1 else _grouped(batches, self.group)

    return ResumableStreamingDataLoader


def _grouped(batches, size: int):
    """Lists of ``size`` consecutive batches; an incomplete last group is dropped."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _naming_store_failures(batches):
    """The batches; a chunk download that failed for good (``ditlab.data.storage``) is raised as its
    one-line StorageError, not as the RuntimeError litdata and DataLoader workers wrap it in."""
    try:
        yield from batches
    except Exception as err:
        failure = storage.named_store_failure(err)
        if failure is None:
            raise
        raise failure from err


class LatentDataModule(LightningDataModule):
    """Batches of (latents (N, C, H, W) float32 in model space, labels (N,) long).

    Args:
        path: a prepared directory, local or in an object store (``s3://bucket/prefix``).
        batch_size: per device. num_workers, pin_memory: as in DataLoader.
        seed: shuffling and per-step sampling seed. flip / sample_posterior: augmentation switches.
        with_images: also hand out each sample's clean image, of the same view as its latent
            (batches become (latents, labels, images uint8 (N, C, H, W))); the data must store them
            (prepared with ``data.store_images=true``): representation alignment encodes them.
        cache_dir: where a remote directory's chunks (under ``chunks/``) and small files are cached on
            this machine (default ``ditlab.data.storage.cache_root()``); unused for a local directory.
        micro_batches: training batches of this many micro-batches of ``batch_size`` (gradient
            accumulation: ``module.accumulate_grad_batches``), one after another.
        multiprocessing_context: how the workers start (None: the platform's default, fork on Linux;
            "spawn" / "forkserver"). Spawned workers of a remote directory fetch as forked ones do.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = True,
        seed: int = 0,
        flip: bool = True,
        sample_posterior: bool = True,
        train_split: str = "train",
        val_split: str = "val",
        drop_last: bool = True,
        with_images: bool = False,
        cache_dir: str | None = None,
        micro_batches: int = 1,
        multiprocessing_context: str | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches}; expected an integer >= 1")
        self.path = str(path)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.flip = flip
        self.sample_posterior = sample_posterior
        self.train_split, self.val_split = train_split, val_split
        self.drop_last = drop_last
        self.cache_dir = cache_dir
        self.micro_batches = micro_batches
        self.multiprocessing_context = multiprocessing_context
        self.prepared = PreparedDir(self.path, cache_dir)
        self.meta = self.prepared.read_meta()
        if flip and stored_views(self.meta) == 1:
            raise ValueError(
                f"flip=true but {self.path} was prepared without flipped views (data.flip=false); expected "
                "flip=false, or delete that directory (or set data.prepared_dir elsewhere) and prepare "
                "with data.flip=true"
            )
        if with_images and not self.meta.get("images"):
            raise ValueError(
                f"with_images=true but {self.path} stores no images; expected data prepared with "
                "data.store_images=true (into another data.prepared_dir)"
            )
        self.with_images = with_images
        self.train_set = self.val_set = None

    # ------------------------------------------------------------ what the data is
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latent_shape"])

    @property
    def channels(self) -> int:
        return self.latent_shape[0]

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def scale_factor(self) -> float:
        return self.meta["vae"]["scale_factor"]

    @property
    def latent_space(self) -> float | dict:
        """How raw latents become model-space ones: the scale factor, or the codec's record when it
        normalises each channel (``models.vae.to_model_space``)."""
        return self.meta["vae"] if "latent_mean" in self.meta["vae"] else self.scale_factor

    def check_data(self) -> None:
        """Fail before training on missing, truncated or foreign shards (one line each)."""
        for split in (self.train_split, self.val_split):
            if split == self.train_split or split in self.meta.get("splits", {}):
                self._check_split(split)

    def _check_split(self, split: str) -> None:
        if self.prepared.remote:
            location = self.prepared.location(split)
            if storage.stat(storage.join(location, "index.json")) is None:
                raise FileNotFoundError(f"split {split!r} missing in {self.path}: expected {location}/index.json")
            check_split(location, self.meta, self._chunk_cache())
            return
        location = Path(self.path) / split
        if not (location / "index.json").is_file():
            raise FileNotFoundError(f"split {split!r} missing in {self.path}: expected {location}/index.json")
        check_split(location, self.meta)

    # ------------------------------------------------------------ loading
    def _chunk_cache(self) -> str:
        return str(Path(self.cache_dir or storage.cache_root()) / "chunks")

    def _dataset(self, split: str, shuffle: bool):
        from litdata import StreamingDataset

        location = f"{self.path.rstrip('/')}/{split}"
        remote = {}
        if self.prepared.remote:
            storage.stream_s3_with_ditlab()
            remote = {"cache_dir": self._chunk_cache()}  # litdata adds <hash of the URL>/<index version>
            # Why (issue 31): litdata memory-maps a cached chunk only when one worker reads it; the
            # chunk two workers share is read from the file in decode windows of ~256 items, each
            # window re-reading the WHOLE chunk (PyTreeLoader._fill_decode_window_path). The second
            # worker's slice starts mid-chunk, so its shuffled blocks straddle two windows and it
            # re-reads the chunk every few items: 125-280 reads of ~60 MB in an epoch whose shuffle put
            # a full-size chunk there (epochs 3+ fell to first-epoch speed; nothing was re-downloaded).
            # Whole-chunk decoding reads it once per visit; same order, one decoded chunk per worker.
            remote["batch_decode"] = "chunk"
        elif not (Path(location) / "index.json").is_file():
            raise FileNotFoundError(f"split {split!r} missing in {self.path}: expected {location}/index.json")
        return StreamingDataset(
            location, shuffle=shuffle, seed=self.seed, drop_last=self.drop_last if shuffle else False, **remote
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._dataset(self.train_split, shuffle=True)
        if self.val_set is None and self.val_split in self.meta.get("splits", {self.val_split: 1}):
            self.val_set = self._dataset(self.val_split, shuffle=False)

    def _loader(self, dataset, group: int = 1):
        workers = self.num_workers > 0
        loader = _resumable_loader_class()(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers,
            drop_last=self.drop_last,
            multiprocessing_context=self.multiprocessing_context if workers else None,
            # the workers do not draw random numbers (module doc): nothing lost where Lightning's seeding is not added
            worker_init_fn=storage.stream_s3_in_worker if workers and self.prepared.remote else None,
        )
        loader.group = group
        return loader

    def train_dataloader(self):
        self.setup("fit")
        return self._loader(self.train_set, group=self.micro_batches)

    def val_dataloader(self):
        self.setup("validate")
        return self._loader(self.val_set) if self.val_set is not None else []

    # ------------------------------------------------------------ per-batch sampling, on the device
    def to_model_batch(
        self, batch: dict, generator: torch.Generator | None = None, held_out: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """(latents (N, C, H, W), labels (N,)), and the images (N, C, H, W) of the same views when
        ``with_images``. ``held_out``: nothing drawn, each latent's posterior mean of the image itself
        (unflipped), the same at every validation and in every run."""
        which = draw_views(batch["latent"], generator, self.flip and not held_out)
        posterior = self.sample_posterior and not held_out
        latents = latents_from_block(
            batch["latent"], self.latent_space, generator, sample_posterior=posterior, which=which
        )
        if not self.with_images:
            return latents, batch["label"].long()
        return latents, batch["label"].long(), images_of_views(batch["image"], which)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is None:
            return self.to_model_batch(batch)
        device, step = _first_tensor(batch).device, trainer.global_step
        if not trainer.training:  # validation: a fixed set (the fixed-timestep loss of training/validation.py)
            return self.to_model_batch(batch, held_out=True)
        # the step's micro-batches (a list when there are several), each its own stream
        parts = batch if isinstance(batch, list) else [batch]
        drawn = [
            self.to_model_batch(part, stream_generator(device, self.seed, "data", trainer.global_rank, step, micro))
            for micro, part in enumerate(parts)
        ]
        return drawn[0] if len(drawn) == 1 else tuple(torch.cat(columns) for columns in zip(*drawn))


def _first_tensor(batch) -> torch.Tensor:
    return (batch[0] if isinstance(batch, list) else batch)["latent"]
