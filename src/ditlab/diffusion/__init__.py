"""Training objectives and samplers. The model knows nothing of these; they call it."""

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion, create_diffusion
from ditlab.diffusion.guidance import CFGModel, mix_guidance
from ditlab.diffusion.sampling import FLOW_SAMPLERS, GAUSSIAN_SAMPLERS, Sampler, respace

__all__ = [
    "CFGModel",
    "FlowMatching",
    "GaussianDiffusion",
    "FLOW_SAMPLERS",
    "GAUSSIAN_SAMPLERS",
    "Sampler",
    "create_diffusion",
    "mix_guidance",
    "respace",
]
