import os

import pytest
import torch

from helpers import compose_fault_run, prepare_tiny_folder, train_in_process

# Tests run on the CPU in fp32 with 2 threads (the CI machine has 2 cores); DITLAB_TEST_THREADS=1
# keeps several developers' test runs on one 2-core machine from oversubscribing it.
torch.set_num_threads(int(os.environ.get("DITLAB_TEST_THREADS", min(2, os.cpu_count() or 1))))
os.environ.setdefault("WANDB_MODE", "offline")

TIERS = ("unit", "integration", "slow")


def pytest_collection_modifyitems(config, items):
    """A test's tier is its folder (tests/unit, tests/integration) unless it is marked otherwise."""
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            folder = item.path.parent.name
            item.add_marker(getattr(pytest.mark, folder if folder in TIERS else "integration"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A tiny prepared folder: 3 classes of 8x8 RGB images as identity 'latents' (no FID reference)."""
    return prepare_tiny_folder(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def prepared_clf(tmp_path_factory):
    """The same folder with a 2-second classifier and its FID reference statistics (fid_clf)."""
    return prepare_tiny_folder(tmp_path_factory.mktemp("prepared_clf"), reference="clf")


@pytest.fixture(scope="session")
def reference(prepared, tmp_path_factory):
    """The uninterrupted fault-test run every interrupted one must end up equal to (its run dir)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_in_process(compose_fault_run(prepared, out))
    return out
