"""Forward cost of a model, counted by ``torch.utils.flop_counter``.

The DiT paper reports "Gflops" that are multiply-accumulates (one MAC = 2 FLOPs): DiT-XL/2 at
256x256 is 118.6 G. Attention matmuls are counted too, so SDPA runs on its math path while
counting (the fused CPU kernel is opaque to the counter).
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def forward_macs(model: torch.nn.Module, batch_size: int = 1) -> float:
    """Multiply-accumulates of one ``model(x, t, y)`` forward per sample."""
    model_device = next(model.parameters()).device
    x = torch.zeros(batch_size, model.in_channels, model.input_size, model.input_size, device=model_device)
    t = torch.zeros(batch_size, dtype=torch.long, device=model_device)
    y = torch.zeros(batch_size, dtype=torch.long, device=model_device)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(x, t, y)
    return counter.get_total_flops() / 2 / batch_size
