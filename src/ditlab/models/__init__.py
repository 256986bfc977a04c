from ditlab.models.dit import DIT_CONFIGS, DiT, build_dit, dit_config
from ditlab.models.official import load_official_checkpoint

__all__ = ["DIT_CONFIGS", "DiT", "build_dit", "dit_config", "load_official_checkpoint"]
