"""Fixtures of the toy-world tests: a tiny random-weight toy model folder, built once."""
from __future__ import annotations

import pytest

from tests.datagen import make_tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every toy-world test module runs its tiny models on one thread (tests/conftest.py)."""
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("toy") / "tiny_model")
