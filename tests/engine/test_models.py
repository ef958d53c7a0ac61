import warnings

import pytest
import torch

import sail.engine.models as models
from sail.engine.configtree import ConfigError
from sail.engine.models import build_components, check_model_folder, encode_prompts, set_attention_backend


def test_xformers_falls_back_to_sdpa_with_one_warning(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("xformers may really run here")
    monkeypatch.setattr(models, "_warned_fallback", False)
    unet = build_components("tiny-sd15", with_vae=False).unet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert set_attention_backend(unet, "xformers") == "sdpa"
        assert set_attention_backend(unet, "xformers") == "sdpa"
    assert sum("falling back to PyTorch SDPA" in str(w.message) for w in caught) == 1
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_missing_or_incomplete_model_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"model folder {tmp_path / 'nope'} does not exist"):
        check_model_folder(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(ConfigError, match="has no 'scheduler/' subfolder"):
        check_model_folder(tmp_path / "half")


def test_sdxl_conditioning_concatenates_penultimate_states_and_pools_the_second_encoder():
    comps = build_components("tiny-sdxl", with_vae=False)
    cond = encode_prompts(comps.text_encoders, comps.tokenizers, ["w1 w2", "w3"])
    ids = comps.tokenizers[1](["w1 w2", "w3"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    out2 = comps.text_encoders[1](ids, output_hidden_states=True)
    assert cond.hidden.shape == (2, 16, 64)
    torch.testing.assert_close(cond.hidden[..., 32:], out2.hidden_states[-2])
    torch.testing.assert_close(cond.pooled, out2.text_embeds)
