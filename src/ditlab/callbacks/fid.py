"""FID during training: every N steps the run's ``FIDProtocol`` (``ditlab.metrics.protocol``) on the
EMA weights, its samples split across ranks (sample i's noise depends on i only, so the score does
not depend on the number of GPUs), featurised, gathered and scored against the reference statistics
``prepare`` stored. Logs ``val/fid`` (Inception) or ``val/fid_clf`` (the dataset classifier) and, for
the classifier, ``val/sample_accuracy_clf`` and the classifier's own accuracy on real validation
images, ``val/classifier_accuracy_clf``; with ``fid_protocol.also_unguided`` the same without guidance
(``val/fid_clf_unguided``, ...). Beside each number its se and confidence interval from the samples
(``val/fid_clf_se``, ``val/fid_clf_ci_low``, ``val/fid_clf_ci_high``) and the extrapolated FID
(``val/fid_clf_inf``): ``fid_protocol.uncertainty``, ``ditlab.metrics.uncertainty``. And the metric's
floor at the same sample count and class draw, held-out real images scored against the same
reference (``val/fid_clf_floor``, ``val/fid_clf_floor_sd``: ``ditlab.metrics.floor``).

The protocol behind the numbers (``FIDProtocol.describe`` with the reference's and the extractor
weights' sha256, the library versions and which weights were sampled) is logged once per run: to the
loggers as the hyperparameter ``fid_protocol_used`` and into metrics.json as ``fid_protocol``. A metric
the protocol asks for but the reference cannot give is named once in the log, with the reason."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ditlab.callbacks.sampling import SamplingCallback
from ditlab.data.prepared import PreparedDir
from ditlab.metrics.curve import RUN_REFERENCE_DIR
from ditlab.metrics.protocol import FIDProtocol
from ditlab.runtime.files import atomic_path

log = logging.getLogger("ditlab.fid")


class FIDCallback(SamplingCallback):
    """``protocol``: what is measured and how (its ``extractor`` None: off); the other arguments are
    ``SamplingCallback``'s."""

    def __init__(self, protocol: FIDProtocol, every_n_steps: int = 10000, **when):
        super().__init__(every_n_steps, **when)
        self.protocol = protocol
        self.enabled = protocol.extractor is not None
        self._reference = self._extractor = None
        self._floor: dict[str, float] = {}  # the metric's floor at this protocol's N (held-out real images)
        self.classifier_accuracy: float | None = None
        self.last: dict[str, float] = {}
        self.record: dict | None = None  # the protocol as measured (describe), once the first FID ran

    def on_fit_start(self, trainer, pl_module):
        if self.enabled:
            self.protocol.sampler_for(pl_module.objective)  # a sampler the objective cannot run fails now

    def setup(self, trainer, pl_module, stage):
        if not self.enabled:
            return
        prepared = trainer.datamodule.prepared
        path = self.protocol.reference_path(prepared)
        if not path.is_file():
            # Training goes on without it; say once, clearly, how to get it.
            log.warning(
                f"FID during training is off: no reference statistics at {path} (run python -m "
                f"ditlab.prepare with data.reference.extractor={self.protocol.extractor}, or set "
                f"fid_protocol.reference=<stats .npz>)"
            )
            self.enabled = False
            return
        self.protocol.check_reference(prepared)  # another extractor's statistics fail now, not at the first FID
        if self.protocol.extractor == "clf" and (info := prepared.classifier / "classifier.json").is_file():
            # The judge's own accuracy on real validation images, logged beside the sample accuracy
            # (val/classifier_accuracy_clf) so that metrics.json says what "sample accuracy" compares with.
            self.classifier_accuracy = json.loads(info.read_text()).get("val_accuracy")

    def on_train_start(self, trainer, pl_module):
        if self.enabled and trainer.is_global_zero:
            keep_reference_in_run_dir(self.protocol, trainer.datamodule.prepared, Path(trainer.default_root_dir))

    def sample_now(self, trainer, pl_module):
        if self.enabled:
            self.evaluate(trainer, pl_module)

    def summary_entries(self) -> dict:
        return {} if self.record is None else {"fid_protocol": self.record}

    def prepare_measuring(self, trainer, pl_module) -> None:
        """The extractor and the reference, built at the first FID (on the run's device); the protocol
        logged once, and what the reference cannot give said once."""
        prepared, protocol = trainer.datamodule.prepared, self.protocol
        self._extractor = protocol.make_extractor(prepared, pl_module.device)
        self._reference = protocol.load_reference(prepared, self._extractor)
        self._floor = protocol.floor(prepared)
        if not trainer.is_global_zero:
            return
        for name, reason in protocol.unavailable(self._reference).items():
            log.warning(f"val/{name} is not measured: {reason}")
        self.record = {**protocol.describe(prepared, pl_module.objective), "weights": self.weights}
        for logger in trainer.loggers:
            logger.log_hyperparams({"fid_protocol_used": self.record})

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        start = time.time()
        if self._extractor is None:
            self.prepare_measuring(trainer, pl_module)
        results = {}
        for suffix, variant in self.protocol.variants():
            measured = self.measure(variant, trainer, pl_module, suffix)
            results.update({f"val/{name}": value for name, value in measured.items()})
        results.update({f"val/{name}": value for name, value in self._floor.items()})
        if self.classifier_accuracy is not None:
            results["val/classifier_accuracy_clf"] = float(self.classifier_accuracy)
        results["val/fid_seconds"] = time.time() - start
        # Logged directly (this also runs in on_train_end, where LightningModule.log is not allowed).
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in results.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(results, step=trainer.global_step)
        self.last = results
        return results

    def measure(self, protocol, trainer, pl_module, suffix: str = "") -> dict[str, float]:
        """``protocol``'s samples drawn on every rank (each its share), featurised, gathered in sample
        order and measured (names ending in ``suffix``, before the se / interval tags)."""
        dm, device = trainer.datamodule, pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        padded = -(-protocol.num_samples // world) * world  # equal shares, so that all_gather lines up
        mine = torch.arange(rank, padded, world)  # this rank's sample indices
        labels = protocol.labels(dm.num_classes)
        labels = torch.cat([labels, labels.new_zeros(padded - protocol.num_samples)])[mine]  # padding: dropped below
        net = self.sampling_net(pl_module)
        codec = self.codec(trainer, pl_module)
        start = time.time()

        def progress(done: int, total: int) -> None:  # a line a batch on rank 0 (a long final FID is minutes)
            if trainer.is_global_zero and total > protocol.batch_size:
                log.info(f"FID samples {done * world}/{protocol.num_samples} ({time.time() - start:.0f} s)")

        images = protocol.generate(
            net, pl_module.objective, codec, dm.num_classes, labels, mine, dm.latent_shape, device, progress
        )
        local = {**self._extractor(images), "labels": labels}  # uint8 (n, C, H, W) in
        if world > 1:
            gathered = {k: pl_module.all_gather(v.to(device)) for k, v in local.items()}  # (world, n, ...)
            # gathered[r][i] is sample r + i * world: interleave back to sample order, drop the padding
            local = {
                k: v.transpose(0, 1).reshape(-1, *v.shape[2:])[: protocol.num_samples].cpu()
                for k, v in gathered.items()
            }
        return protocol.measure(local, self._reference, local["labels"], suffix, device)


def keep_reference_in_run_dir(protocol: FIDProtocol, prepared: PreparedDir, run_dir: Path) -> Path:
    """Copy what the FID is measured against (the reference statistics and, for fid_clf, the
    classifier) into ``<run dir>/fid_reference/`` once, laid out as in a prepared dir: the run's FID
    curve (``ditlab.evaluate run_dir=``) is then measured without the prepared dir."""
    kept = run_dir / RUN_REFERENCE_DIR
    if kept.is_dir():
        return kept
    with atomic_path(kept) as tmp:
        copy = PreparedDir(tmp)
        tmp.mkdir()
        shutil.copyfile(protocol.reference_path(prepared), copy.reference(protocol.extractor))
        classifier = protocol.extractor_weights(prepared) if protocol.extractor == "clf" else None
        if classifier:
            shutil.copytree(classifier, copy.classifier)
    return kept
