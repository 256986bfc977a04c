"""A prepared dataset's folder, its files named in one place.

<root>/
  meta.json                 dataset, classes, counts, latent shape/format/dtype, views, VAE and scale factor
  train/ val/               latent shards (``ditlab.data.shards``)
  vae/                      the small VAE prepare trained (``ditlab.pipelines.fit_vae``: weights and its recipe)
  classifier/               the dataset classifier behind the offline fid_clf (safetensors + classifier.json)
  reference_<extractor>.npz FID reference statistics of real images (``ditlab.metrics.reference``)
"""

from __future__ import annotations

import json
from pathlib import Path

from ditlab.runtime.files import write_json

META_KEYS = ("num_classes", "latent_shape", "vae")


class PreparedDir:
    META = "meta.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"PreparedDir({str(self.root)!r})"

    @property
    def meta_path(self) -> Path:
        return self.root / self.META

    def split(self, name: str) -> Path:
        return self.root / name

    def reference(self, extractor: str) -> Path:
        return self.root / f"reference_{extractor}.npz"

    @property
    def classifier(self) -> Path:
        return self.root / "classifier"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    def is_prepared(self) -> bool:
        return self.meta_path.is_file()

    def read_meta(self) -> dict:
        if not self.meta_path.is_file():
            raise FileNotFoundError(
                f"no prepared dataset at {str(self.root)!r} (missing {self.META}); run "
                "'python -m ditlab.prepare data=<dataset> vae=<vae>' first"
            )
        try:
            meta = json.loads(self.meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{self.meta_path} is not valid JSON ({err}); expected the {self.META} written by ditlab.prepare"
            ) from err
        missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else ["*"]
        if missing:
            raise ValueError(
                f"{self.meta_path} lacks {missing[0]!r}; expected the {self.META} written by ditlab.prepare"
            )
        return meta

    def write_meta(self, meta: dict) -> None:
        write_json(self.meta_path, meta)
