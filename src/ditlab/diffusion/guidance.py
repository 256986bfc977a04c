"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around any model.

Samplers never branch on guidance: they call ``model(x, t, y)``, and ``CFGModel`` turns that one
call into a single batched forward over the conditional and the unconditional (null-label) inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def mix_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + s (cond - uncond): s = 1 is the conditional model, s = 0 the unconditional one.
    Written in this order because it is the official expression, which keeps results bit-exact."""
    return uncond + scale * (cond - uncond)


class CFGModel:
    """``model(x, t, y)`` with classifier-free guidance.

    Args:
        model: callable (x, t, y) -> output with C (eps / velocity) or 2C (eps, v) channels.
        scale: guidance scale; 1.0 means no guidance and costs a single forward.
        null_label: the label index of the unconditional embedding (DiT: num_classes).
        guided_channels: how many leading output channels are guided; None guides all ``in_channels``
            (the right thing); 3 reproduces the official DiT sampling, which guided only 3 of 4.
        in_channels: the data channels; channels beyond them (learned variance) are never guided.
        interval: optional (t_lo, t_hi) in the model's time units: guide only when t_lo <= t <= t_hi
            (Kynkäänniemi et al. 2024: limiting guidance to the middle of the trajectory lowers FID).
    """

    def __init__(
        self,
        model: Callable,
        scale: float,
        null_label: int,
        in_channels: int,
        guided_channels: int | None = None,
        interval: tuple[float, float] | None = None,
    ):
        if guided_channels is not None and not 0 < guided_channels <= in_channels:
            raise ValueError(f"guided_channels={guided_channels} must be in 1..in_channels={in_channels}")
        if interval is not None and not interval[0] <= interval[1]:
            raise ValueError(f"guidance interval {tuple(interval)} must be (low, high) with low <= high")
        self.model = model
        self.scale = float(scale)
        self.null_label = null_label
        self.in_channels = in_channels
        self.guided_channels = in_channels if guided_channels is None else guided_channels
        self.interval = interval

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.model(x, t, y)
        if self.interval is not None:
            lo, hi = self.interval
            inside = (t >= lo) & (t <= hi)
            if not inside.any():  # outside the interval the output is the conditional one: skip the other half
                return self.model(x, t, y)
        n = x.shape[0]
        out = self.model(
            torch.cat([x, x], dim=0),  # (2N, C, H, W)
            torch.cat([t, t], dim=0),
            torch.cat([y, torch.full_like(y, self.null_label)], dim=0),
        )
        cond, uncond = out[:n], out[n:]
        g = self.guided_channels
        guided = mix_guidance(cond[:, :g], uncond[:, :g], self.scale)
        if self.interval is not None:
            guided = torch.where(inside.view(-1, *([1] * (x.dim() - 1))), guided, cond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings (the ``guidance`` config node of the grids, the FID and
    ``ditlab.sample``): ``scale`` 1.0 is none; ``channels`` None guides every latent channel (3: the
    official FID-2.27 protocol); ``interval`` [t_lo, t_hi] in the model's time units."""

    scale: float = 1.0
    channels: int | None = None
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        if self.scale < 0:
            raise ValueError(f"guidance.scale={self.scale}; expected a number >= 0 (1.0: no guidance)")
        if self.interval is not None:  # a config list -> a comparable, hashable pair
            if len(self.interval) != 2:
                raise ValueError(f"guidance.interval={list(self.interval)}; expected [t_lo, t_hi]")
            object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))

    def describe(self) -> str:
        if self.scale == 1.0:
            return "no guidance"
        where = "" if self.interval is None else f" for t in [{self.interval[0]:g}, {self.interval[1]:g}]"
        channels = "" if self.channels is None else f" on the first {self.channels} channels"
        return f"guidance {self.scale:g}{channels}{where}"

    def wrap(self, net: Callable, null_label: int, in_channels: int) -> CFGModel:
        return CFGModel(net, self.scale, null_label, in_channels, self.channels, self.interval)


def official_forward_with_cfg(
    net: Callable,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    cfg_scale: float,
    guided_channels: int | None = None,
) -> torch.Tensor:
    """The official ``DiT.forward_with_cfg``, kept as a reference for tests and the FID-2.27 protocol.

    x, t, y hold the conditional half then the unconditional half (y = null label); only the first
    half of x is used. The official code guides only the first 3 latent channels (a leftover from RGB
    code): ``guided_channels=3`` is that behaviour, None guides every channel of ``net.in_channels``.
    Unguided channels (and the variance channels) keep each half's own output, as officially.
    """
    half = x[: len(x) // 2]
    out = net(torch.cat([half, half], dim=0), t, y)  # (2N, C_out, H, W)
    g = net.in_channels if guided_channels is None else guided_channels
    cond, uncond = out[:, :g].chunk(2, dim=0)  # each (N, g, H, W)
    guided = mix_guidance(cond, uncond, cfg_scale)
    return torch.cat([torch.cat([guided, guided], dim=0), out[:, g:]], dim=1)
