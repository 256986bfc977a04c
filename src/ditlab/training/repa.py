"""Representation alignment (REPA, Yu et al. 2024, "Representation Alignment for Generation: Training
Diffusion Transformers Is Easier Than You Think"): the tokens after block ``depth`` of the DiT,
through a small MLP projector, are pulled towards a frozen encoder's patch features of the *clean*
image (negative cosine similarity, averaged over tokens), weighted by ``coef`` and added to the
diffusion loss.

The DiT stays a plain nn.Module: the tokens are read by a forward hook on its block, from outside,
and the training step takes them right after its forward (``take_tokens``) to hand them to
``loss``. The hook is registered once, before the blocks are compiled, and stays: torch.compile
does not re-check a module's hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so one
added or removed around each forward would be missed or replayed by the compiled block. The
projector trains with the network but is not part of it (not in the EMA, not exported). The
encoder is frozen and kept out of the module's state (its weights come from its own file).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECTOR_INITS = ("xavier", "torch")


class REPA(nn.Module):
    """Args:
    encoder: a frozen ``ditlab.models.encoders`` encoder: uint8 images (N, C, H, W) -> (N, E, h, w).
    depth: align the tokens that leave block ``depth`` (1-based; REPA: 8 of SiT-XL's 28).
    coef: the alignment loss's weight (REPA: 0.5).
    projector_dim: the projector MLP's hidden width (REPA: 2048).
    projector_init: "xavier" (REPA's: its SiT's ``initialize_weights`` reaches the projectors, Xavier-
        uniform weights and zero biases) or "torch" (PyTorch's nn.Linear default, what ditlab used first).
    """

    def __init__(
        self,
        encoder: nn.Module,
        depth: int = 8,
        coef: float = 0.5,
        projector_dim: int = 2048,
        projector_init: str = "xavier",
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"repa.depth={depth}; expected a block number >= 1")
        if coef < 0:
            raise ValueError(f"repa.coef={coef}; expected a number >= 0")
        if projector_init not in PROJECTOR_INITS:
            raise ValueError(f"repa.projector_init={projector_init!r}; expected one of {PROJECTOR_INITS}")
        self.depth, self.coef, self.projector_dim = depth, coef, projector_dim
        self.projector_init = projector_init
        self._encoder = [encoder.eval()]  # in a list: frozen, not a submodule, not in the checkpoint
        self.projector: nn.Module | None = None
        self._tokens: torch.Tensor | None = None

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def attach(self, net: nn.Module) -> None:
        """Build the projector for ``net``'s width and start reading the tokens of its block ``depth``."""
        if self.depth > len(net.blocks):
            raise ValueError(f"repa.depth={self.depth} but the model has {len(net.blocks)} blocks; expected 1..")
        hidden = net.pos_embed.shape[-1]
        self.projector = nn.Sequential(
            nn.Linear(hidden, self.projector_dim),
            nn.SiLU(),
            nn.Linear(self.projector_dim, self.projector_dim),
            nn.SiLU(),
            nn.Linear(self.projector_dim, self.encoder.feature_dim),
        )
        if self.projector_init == "xavier":
            for layer in self.projector:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
        self.grid = net.grid_size
        net.blocks[self.depth - 1].register_forward_hook(self._keep_tokens)

    def _keep_tokens(self, block, inputs, output) -> None:
        if self.training:  # the training forward only: sampling and validation leave nothing behind
            self._tokens = output  # (N, T, D)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's features of the clean images on the DiT's token grid: (N, T, E)."""
        encoder = self.encoder.to(images.device)
        features = encoder(images)  # (N, E, h, w)
        if features.shape[-1] != self.grid:  # REPA sizes its images so that the grids agree; else resample
            features = F.adaptive_avg_pool2d(features, self.grid)  # (N, E, G, G)
        return features.flatten(2).transpose(1, 2)  # (N, T, E)

    def take_tokens(self) -> torch.Tensor:
        """The tokens (N, T, D) of the last training forward, handed over once."""
        if self._tokens is None:
            raise RuntimeError("repa: no tokens kept; expected a training forward of the network first")
        tokens, self._tokens = self._tokens, None
        return tokens

    def loss(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Per sample (N,): 1 - the cosine similarity of the projected tokens (N, T, D) with the
        encoder's features of ``images``, averaged over tokens. REPA writes it as the negative
        similarity; the constant 1 keeps the logged value in [0, 2] and changes no gradient."""
        projected = self.projector(tokens.float())  # (N, T, E)
        return 1.0 - F.cosine_similarity(projected, self.target(images).float(), dim=-1).mean(dim=1)
