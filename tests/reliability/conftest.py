"""Fixtures of the reliability tests: the tiny prepared folder and one uninterrupted reference run."""

from __future__ import annotations

import pytest
from reliability_runs import STEPS, compose, train_in_process

from helpers import prepare_tiny_folder


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    return prepare_tiny_folder(tmp_path_factory.mktemp("reliability_prepared"))


@pytest.fixture(scope="session")
def reference(prepared, tmp_path_factory):
    """The uninterrupted run every interrupted one must end up equal to (its run dir)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_in_process(compose(prepared, out, steps=STEPS))
    return out
