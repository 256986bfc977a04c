"""FID during training: every N steps, K samples from the EMA weights with the configured sampler
and guidance (``ditlab.inference.generate``: sample i's noise depends on i only, so the score does
not depend on the number of GPUs), split across ranks, featurised, gathered, and scored against
the reference statistics stored by ``prepare``. Logs ``val/fid`` (Inception) or
``val/fid_clf`` (the dataset classifier) and, for the classifier, ``val/sample_accuracy_clf`` and
the classifier's own accuracy on real validation images, ``val/classifier_accuracy_clf``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ditlab.callbacks.sampling import SamplingCallback
from ditlab.diffusion import Sampler
from ditlab.inference import generate, sample_labels

log = logging.getLogger("ditlab.fid")


class FIDCallback(SamplingCallback):
    """FID of ``num_samples`` samples (uniform random classes) against the reference statistics;
    ``extractor`` clf / inception (null: off), ``metrics`` a subset of (fid, isc, kid, prc); the other
    arguments are ``SamplingCallback``'s."""

    def __init__(
        self,
        sampler: Sampler,
        every_n_steps: int = 10000,
        num_samples: int = 1000,
        batch_size: int = 250,
        extractor: str | None = "clf",
        reference: str | None = None,
        weights_path: str | None = None,
        metrics=("fid",),
        **sampling,
    ):
        if num_samples < 2:  # a covariance needs two samples
            raise ValueError(f"fid num_samples={num_samples} must be >= 2")
        super().__init__(sampler, every_n_steps, **sampling)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.extractor_kind = extractor
        self.reference_path = reference
        self.weights_path = weights_path
        self.metrics = tuple(metrics)
        self._reference = self._extractor = None
        self.classifier_accuracy: float | None = None
        self.enabled = True
        self.last: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage):
        from ditlab.metrics.reference import ReferenceStats

        dm = trainer.datamodule
        if not self.extractor_kind:
            self.enabled = False
            return
        path = Path(self.reference_path or Path(dm.path) / f"reference_{self.extractor_kind}.npz")
        if not path.is_file():
            # Training goes on without it; say once, clearly, how to get it.
            log.warning(
                f"FID during training is off: no reference statistics at {path} (run python -m "
                f"ditlab.prepare with data.reference.extractor={self.extractor_kind}, or set "
                f"callbacks.fid.reference=<stats .npz>)"
            )
            self.enabled = False
            return
        self._reference = ReferenceStats.load(path, self.extractor_kind)
        if self.extractor_kind == "clf" and self.weights_path is None:
            self.weights_path = str(Path(dm.path) / "classifier")
        if self.extractor_kind == "clf":
            # The judge's own accuracy on real validation images, logged beside the sample accuracy
            # (val/classifier_accuracy_clf) so that metrics.json says what "sample accuracy" compares with.
            info = Path(self.weights_path) / "classifier.json"
            if info.is_file():
                self.classifier_accuracy = json.loads(info.read_text()).get("val_accuracy")

    def run(self, trainer, pl_module):
        if self.enabled:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        from ditlab.data.transforms import model_range_to_uint8
        from ditlab.metrics.fidelity import Extractor, compute_metrics

        start = time.time()
        dm, device = trainer.datamodule, pl_module.device
        if self._extractor is None:
            self._extractor = Extractor(self.extractor_kind, self.weights_path, device=str(device))
        rank, world = trainer.global_rank, trainer.world_size
        padded = -(-self.num_samples // world) * world  # equal shares, so that all_gather lines up
        mine = torch.arange(rank, padded, world)  # this rank's sample indices
        labels = sample_labels(dm.num_classes, self.num_samples, self.seed)
        labels = torch.cat([labels, labels.new_zeros(padded - self.num_samples)])[mine]  # padding: dropped below
        kwargs = self.sample_kwargs(trainer, pl_module)
        images = generate(labels=labels, indices=mine, batch_size=self.batch_size, **kwargs)  # (n, C, H, W)
        out = self._extractor(model_range_to_uint8(images).permute(0, 3, 1, 2))  # uint8 (n, C, H, W) in
        local = {"features": out["features"], "logits": out["logits"], "labels": labels}
        if world > 1:
            gathered = {k: pl_module.all_gather(v.to(device)) for k, v in local.items()}  # (world, n, ...)
            # gathered[r][i] is sample r + i * world: interleave back to sample order, drop the padding
            local = {
                k: v.transpose(0, 1).reshape(-1, *v.shape[2:])[: self.num_samples].cpu() for k, v in gathered.items()
            }
        results = compute_metrics(
            local, self._reference, self.metrics, labels=local["labels"] if self.extractor_kind == "clf" else None
        )
        if self.classifier_accuracy is not None:
            results["classifier_accuracy_clf"] = float(self.classifier_accuracy)
        results = {f"val/{k}": v for k, v in results.items()}
        results["val/fid_seconds"] = time.time() - start
        # Logged directly (this also runs in on_train_end, where LightningModule.log is not allowed).
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in results.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(results, step=trainer.global_step)
        self.last = results
        return results
