"""Fixtures shared by the engine tests."""
import pytest

from tests.datagen import make_tiny_model


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """A random-weight toy model folder (the SAIL loop's mechanics do not need a trained one)."""
    return str(make_tiny_model(tmp_path_factory.mktemp("model") / "toy"))
