"""SiT's released checkpoints (Ma et al. 2024, willisma/SiT) in ditlab.

SiT's network is DiT's, key for key (``models.py``: the same embedders, blocks and final layer; its
released SiT-XL/2 keeps DiT's learned-sigma head, whose channels its forward drops). What differs is
time: SiT's network takes t in [0, 1] with t = 1 the data (its ``ICPlan``: x_t = t x_1 + (1 - t) x_0,
x_1 the data) and predicts the velocity x_1 - x_0, where ditlab's flow runs t = 1 to the noise
(``models.released.SIT.flow_time``: ``FlowMatching(time_scale=1, data_at_one=True)``). Files: the
released ``SiT-XL-2-256x256.pt`` (a plain state_dict) or its ``train.py``'s checkpoints (``{"model",
"ema", "opt", "args"}``, ``args.model`` "SiT-XL/2").
"""

from __future__ import annotations

from pathlib import Path

from ditlab.models.official import official_layout_weights
from ditlab.models.released import SIT, ReleasedWeights, training_weights


def read_sit(
    obj: dict, path: str | Path, ema: bool = True, num_heads: int | None = None, evidence: str = ""
) -> ReleasedWeights:
    """SiT's reader: the file's object (``models.released.read_released_file``) in ditlab's layout."""
    state_dict, weights = training_weights(obj, path, ema)
    return official_layout_weights(state_dict, path, SIT, num_heads, weights, evidence)
