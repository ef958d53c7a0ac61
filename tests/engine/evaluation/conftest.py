"""Random-weight scorers of the real architectures, saved in the formats the real weights come
in (a transformers CLIP folder, an open_clip state dict, the aesthetic MLP state dict)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

WORDS = [f"w{i}" for i in range(40)] + ["a", "cat", "dog", "red", "photo", "of", "painting"]


def tiny_clip_config(projection_dim: int = 16):
    from transformers import CLIPConfig

    # gelu (not quick_gelu) and the default eos id 2 (pooling at the argmax token): as in
    # open_clip's ViT-H-14 and its transformers conversion.
    text = dict(vocab_size=len(WORDS) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu", bos_token_id=0,
                pad_token_id=1, eos_token_id=2)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act="gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_clip_folder(folder, seed: int = 0, projection_dim: int = 16):
    """A transformers CLIP folder: model (random weights), word tokenizer, CLIP image processor."""
    from transformers import CLIPImageProcessor, CLIPModel

    from sail.engine.models import build_word_tokenizer

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(projection_dim))
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(100.0)))   # PickScore's trained value
    model.save_pretrained(folder)
    build_word_tokenizer(WORDS, 16).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    return save_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="session")
def images_and_prompts():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 40, 48, 3), dtype=np.uint8)
    prompts = ["a red cat", "a dog", "photo of a cat", "painting of w3", "w1 w2 w3 w4 w5", "dog", "red red dog"]
    return images, prompts
