"""Fixtures shared by the engine tests."""
import pytest

from tests.datagen import make_tiny_model


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """A random-weight toy model folder (the SAIL loop's mechanics do not need a trained one)."""
    return str(make_tiny_model(tmp_path_factory.mktemp("model") / "toy"))


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Random-weight tiny SD1.5 and SDXL model folders (with VAE and text encoders), by arch."""
    from sail.engine.models import build_components, save_model_folder

    out = {}
    for arch in ("tiny-sd15", "tiny-sdxl"):
        comps = build_components(arch, seed=0)
        folder = tmp_path_factory.mktemp("models") / arch
        save_model_folder(folder, comps.unet.state_dict(), dict(comps.unet.config), comps, source=None)
        out[arch] = str(folder)
    return out
