"""Training objectives, samplers and guidance. The model knows nothing of these; they call it."""

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion, create_diffusion
from ditlab.diffusion.guidance import CFGModel, Guidance, mix_guidance, official_forward_with_cfg
from ditlab.diffusion.samplers import SAMPLERS, Sampler, samplers_for

__all__ = [
    "CFGModel",
    "FlowMatching",
    "Guidance",
    "GaussianDiffusion",
    "SAMPLERS",
    "Sampler",
    "create_diffusion",
    "mix_guidance",
    "official_forward_with_cfg",
    "samplers_for",
]
