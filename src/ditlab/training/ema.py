"""Exponential moving average of a network's weights, as a small module with a state_dict.

Explicit about what is averaged: trainable parameters only. Frozen parameters (DiT's fixed
``pos_embed``) and buffers are copied, not averaged: averaging a constant is a no-op at best and
silently wrong if it ever changes (the official DiT averaged pos_embed and ignored buffers).
The copy is kept in fp32 whatever precision training runs in.

Under sharding (``shard_like``) each averaged tensor is sharded exactly as its weight is, so the
update is a local foreach op on every rank and the checkpoint (Lightning gathers sharded state)
holds the full average under the same ``ema.net.*`` keys. ``full_net()`` gives a plain full copy
for sampling: collective under sharding, so every rank calls it.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn as nn

from ditlab.training.parallel import full_state_dict, is_sharded, local, materialize, meta_copy, shard_like


class _Pairs(NamedTuple):
    """The tensors ``EMA.update`` works on, listed once: walking the module tree every step costs
    host time that grows with depth (measured in experiments/benchmarks/README.md)."""

    net: nn.Module  # the network they were listed for
    averaged: list[tuple[torch.Tensor, torch.Tensor]]  # (trainable parameter, its average)
    copied: list[tuple[torch.Tensor, torch.Tensor]]  # (frozen parameter or buffer, its copy)
    slots: list[tuple[dict, str, torch.Tensor]]  # (a module's _parameters or _buffers, name, the tensor there)

    def still_registered(self) -> bool:
        """Whether every listed tensor is still the one its module holds: a load with ``assign=True``,
        sharding or a move may put new tensors in place (identity checks: no walk of the tree)."""
        return all(store.get(name) is t for store, name, t in self.slots)


def _slots(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    slots = []
    for kind, named in (("_parameters", module.named_parameters()), ("_buffers", module.named_buffers())):
        for name, t in named:
            owner, _, attr = name.rpartition(".")
            slots.append((getattr(module.get_submodule(owner), kind), attr, t))
    return slots


class EMA(nn.Module):
    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = False):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.net = copy.deepcopy(net).float().eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # A host-side copy of num_updates: reading the buffer every step would sync with the GPU.
        self._count = 0
        # The plain module on the meta device, to materialize full copies into (in a list: not a
        # submodule, not in the state).
        self._skeleton: list[nn.Module] = [meta_copy(self.net)]
        self._paired: _Pairs | None = None  # the tensors update() pairs, listed on its first call

    def current_decay(self) -> float:
        # With warm-up the average forgets its random start quickly: min(decay, (1 + n) / (10 + n)).
        if not self.warmup:
            return self.decay
        n = self._count
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def shard_like(self, net: nn.Module) -> None:
        """Shard every averaged tensor as ``net``'s (an FSDP2-sharded network with the same names)."""
        for (name, p), (ema_name, ema_p) in zip(net.named_parameters(), list(self.net.named_parameters())):
            assert name == ema_name
            if is_sharded(p):
                owner, _, attr = ema_name.rpartition(".")
                module = self.net.get_submodule(owner)
                setattr(module, attr, nn.Parameter(shard_like(ema_p.detach(), p), requires_grad=False))

    def full_net(self) -> nn.Module:
        """The averaged network as a plain module with full weights (collective when sharded)."""
        return self.materialize(self.net) if self.sharded else self.net

    @property
    def sharded(self) -> bool:
        return any(is_sharded(p) for p in self.net.parameters())

    def materialize(self, net: nn.Module) -> nn.Module:
        """``net`` (the EMA's or the training network: same names) as a plain module in eval mode
        with full weights: gathered when sharded (collective), else sharing ``net``'s tensors (so
        sampling from the raw weights during training runs without label dropout)."""
        return materialize(self._skeleton[0], full_state_dict(net)).eval()

    def _pairs(self, net: nn.Module) -> _Pairs:
        """``net``'s tensors matched with the average's by name; listed again only when a module
        holds other tensors than those listed."""
        if self._paired is None or self._paired.net is not net or not self._paired.still_registered():
            named, ema_named = list(net.named_parameters()), list(self.net.named_parameters())
            names, ema_names = [n for n, _ in named], [n for n, _ in ema_named]
            if names != ema_names:
                first = next((a, b) for a, b in zip([*names, None], [*ema_names, None]) if a != b)
                raise ValueError(f"EMA of a different network: the average's {first[1]!r} faces {first[0]!r}")
            averaged, copied = [], []
            for (_, p), (_, ema_p) in zip(named, ema_named):
                (averaged if p.requires_grad else copied).append((p, ema_p))
            copied += list(zip(net.buffers(), self.net.buffers()))
            self._paired = _Pairs(net, averaged, copied, _slots(net) + _slots(self.net))
        return self._paired

    @torch.no_grad()
    def update(self, net: nn.Module, keep: bool | torch.Tensor = True) -> None:
        """One EMA step towards ``net``, unless ``keep`` is False (a skipped non-finite step: nothing
        changes). ``keep`` may be a 0-dim 0./1. tensor on the device that masks the step without a host
        sync (0: nothing changes but the host count behind the warm-up decay)."""
        if keep is False:
            return
        keep = None if keep is True else keep
        decay = self.current_decay()
        pairs = self._pairs(net)
        ema_params, params = [], []
        for p, ema_p in pairs.averaged:
            p, ema_p = local(p), local(ema_p)  # this rank's shards when sharded
            ema_params.append(ema_p)
            params.append(p if p.dtype == ema_p.dtype else p.to(ema_p.dtype))
        if ema_params and keep is None:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema += (1 - decay) * (p - ema)
        elif ema_params:
            deltas = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(deltas, keep)
            torch._foreach_add_(ema_params, deltas, alpha=1.0 - decay)  # ema += keep (1 - decay) (p - ema)
        for t, ema_t in pairs.copied:
            local(ema_t).copy_(local(t))
        self.num_updates += 1 if keep is None else keep.to(self.num_updates.dtype)
        self._count += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "num_updates"
        if key in state_dict:
            self._count = int(state_dict[key])  # once, on load

    def train(self, mode: bool = True):
        # The averaged copy always stays in eval mode (no label dropout when it samples).
        super().train(mode)
        self.net.eval()
        return self
