"""Where the DALI path leaves its pixels: on the device the VAE runs on, never copied back to
the host in between. The CUDA case needs a GPU (skipped elsewhere); on a CPU the same code runs
with the VAE and DALI on the CPU."""
from __future__ import annotations

import pytest
import torch

from sail.engine.data.dali import dali_available
from tests.datagen import pickapic_rows, write_pickapic

R = 32
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed")


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_leaves_the_pixels_on_its_device(device):
    """PNGs already at the resolution (no resize): the pixels are the exact 8-bit values, on the
    requested device, whatever device decoded them."""
    from sail.engine.data.dali import DaliPairDecoder, ImagePlan
    from sail.engine.data.images import decode_image, to_model_range

    cols = pickapic_rows(3, seed=4, size=(32, 40))
    pairs = list(zip(cols["jpg_0"], cols["jpg_1"]))
    plan = ImagePlan((32, 40), (32, 40), (0, 5))
    decoder = DaliPairDecoder(R, device, num_threads=1, max_batch_pairs=2)         # two DALI batches
    pixels = decoder.decode(pairs, [(plan, plan, False)] * len(pairs))
    assert pixels.device.type == device and pixels.dtype == torch.float32 and pixels.shape == (3, 2, 3, R, R)
    want = to_model_range([decode_image(b)[:, 5:5 + R] for pair in pairs for b in pair]).view(3, 2, 3, R, R)
    torch.testing.assert_close(pixels.cpu(), want, rtol=0, atol=1e-6)      # (x - 127.5) / 127.5 vs x / 127.5 - 1


@pytest.mark.parametrize("device", DEVICES)
def test_encode_pass_hands_dali_pixels_to_the_vae_where_it_runs(tmp_path, monkeypatch, device):
    """Every batch of pixels reaches the VAE on the VAE's device, and the decoder was asked for
    that device; the latents match those of a CPU run (the same pixels: no resize)."""
    from sail.engine.config import DataConfig
    from sail.engine.data import dali, encode
    from sail.engine.data.cache import PairCache
    from sail.engine.models import build_components

    path = write_pickapic(tmp_path / "pairs.parquet", pickapic_rows(6, seed=8, size=(32, 40)))
    cfg = DataConfig(train=[path], resolution=R, random_crop=True, decoder="dali", encode_batch_size=4)
    latents = {}
    for where in dict.fromkeys(["cpu", device]):
        comps = build_components("tiny-sdxl", 0)
        for module in [comps.vae, *comps.text_encoders]:
            module.to(where)
        seen, asked = [], []
        real_encode, real_decoder = encode.encode_pixels, dali.shared_decoder
        monkeypatch.setattr(encode, "encode_pixels", lambda c, px, g: seen.append(px.device) or real_encode(c, px, g))
        monkeypatch.setattr(dali, "shared_decoder", lambda res, dev: asked.append(dev) or real_decoder(res, dev))
        cache = PairCache(encode.encode_pickapic(cfg, comps, tmp_path / where, seed=1, shard_size=4, progress=False))
        assert seen and set(seen) == {comps.vae.device} and set(asked) == {comps.vae.device}, (seen, asked)
        latents[where] = cache.load(range(len(cache))).latents_w
    # the same pixels; the VAE's convolutions differ by float rounding between devices (TF32 on a GPU)
    assert (latents[device] - latents["cpu"]).abs().max() <= 1e-2 * latents["cpu"].abs().max()
