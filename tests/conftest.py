import os

import pytest
import torch

# Tests run on the CPU in fp32 with 2 threads (the CI machine has 2 cores); DITLAB_TEST_THREADS=1
# keeps several developers' test runs on one 2-core machine from oversubscribing it.
torch.set_num_threads(int(os.environ.get("DITLAB_TEST_THREADS", min(2, os.cpu_count() or 1))))
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
