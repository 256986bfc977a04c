"""The first step's gradient norm of each flow loss term on a freshly initialised dit_fmnist (its
output layer starts at zero): `python experiments/recipes/cos_gradient.py`. The figure is in
experiments/recipes/README.md (LightningDiT's cosine loss)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import ditlab
from ditlab.diffusion.flow import velocity_direction_loss

SHAPE = ["model.input_size=8", "model.in_channels=4", "model.num_classes=10"]  # the default data's


def main() -> None:
    with initialize_config_dir(config_dir=str(Path(ditlab.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose("train", ["experiment=fmnist_cpu", *SHAPE])
    torch.manual_seed(0)
    net = instantiate(cfg.model)
    data, noise, t = torch.randn(32, 4, 8, 8), torch.randn(32, 4, 8, 8), torch.rand(32)
    x_t = (1 - t.view(-1, 1, 1, 1)) * data + t.view(-1, 1, 1, 1) * noise  # (N, C, H, W)
    labels = torch.randint(0, 10, (32,))
    target = noise - data  # the velocity
    terms = {
        "mse": lambda v: ((v - target) ** 2).mean(),
        "cos": lambda v: velocity_direction_loss(v, target).mean(),
    }
    for name, loss_of in terms.items():
        net.zero_grad()
        v = net(x_t, t * 1000, labels)
        loss_of(v).backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in net.parameters() if p.grad is not None))
        print(f"{name}: output |v| max {v.abs().max().item():.3g}, gradient norm {norm.item():.3g}")


if __name__ == "__main__":
    main()
