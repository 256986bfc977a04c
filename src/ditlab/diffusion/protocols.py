"""The published sampling protocols of the DiT family, as named options (``conf/protocol/<name>.yaml``:
``protocol=sit`` on ``ditlab.sample``; the default of a released checkpoint of that family).

Each file holds a ``sampler`` and a ``guidance`` node and cites, in its comment, the FID-50K its paper
published with them. The files are the one source: ``ditlab.sample`` composes them as a config group,
and ``published_protocol`` reads the same file for a released checkpoint's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from ditlab.diffusion.guidance import Guidance
from ditlab.diffusion.samplers import Sampler

PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "conf" / "protocol"
PROTOCOLS = tuple(sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml")))


@dataclass(frozen=True)
class Protocol:
    name: str
    sampler: Sampler
    guidance: Guidance


def protocol_from_node(name: str, node) -> Protocol:
    """A protocol from its config node (``sampler``, ``guidance``)."""
    return Protocol(name, instantiate(node.sampler), instantiate(node.guidance))


def published_protocol(name: str) -> Protocol:
    """The protocol ``conf/protocol/<name>.yaml`` holds (dit, sit, repa, lightningdit)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol={name!r}; expected one of {PROTOCOLS}")
    return protocol_from_node(name, OmegaConf.load(PROTOCOL_DIR / f"{name}.yaml"))
