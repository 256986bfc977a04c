import os

import pytest
import torch

# Tests run on the CPU in fp32 with 2 threads (the CI machine has 2 cores).
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
