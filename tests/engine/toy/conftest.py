"""Fixtures of the toy-world tests: a tiny random-weight toy model folder, built once."""
from __future__ import annotations

import pytest
import torch

from engine.toy.model import (ToyModelSpec, build_scheduler, build_text_encoder, build_tokenizer, build_unet,
                              save_toy_model)

TINY_SPEC = ToyModelSpec(unet_channels=(8, 16, 16), text_hidden=16, text_layers=1)


def make_tiny_model(folder, seed: int = 0):
    """Write a tiny random toy model folder (the real architecture, fewer channels)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return save_toy_model(folder, build_unet(TINY_SPEC), build_text_encoder(TINY_SPEC, len(tokenizer)), tokenizer,
                          build_scheduler())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, and much faster on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("toy") / "tiny_model")
