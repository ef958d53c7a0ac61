"""The DALI decoding path against the PIL path (``images.prepare_pair``), on CPU.

Tolerance: the geometry (resize size, crop offsets, flip, SDXL time ids) must agree exactly;
pixels agree exactly (to float rounding of the normalisation) where no resize happens (PNG, and JPEG: both decode with libjpeg-turbo on
CPU) and within the resampling difference where they are resized (PIL bicubic vs DALI cubic
with antialiasing): on smooth images downscaled <= 1.6x, mean |diff| <= 0.004 and
max |diff| <= 2/127.5 (two 8-bit levels) in the [-1, 1] range.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sail.engine.data.dali import dali_available, plan_pair
from sail.engine.data.images import decode_image, prepare_pair

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda120)")
R = 32


def smooth_image(h: int, w: int, seed: int, fmt: str = "PNG") -> bytes:
    """Low-frequency colour waves: content on which resampling filters may be compared."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6))
                for _ in range(3)]
    arr = ((np.stack(channels, -1) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


# sizes (h, w): resized ones (shorter side 40-48 -> 32) and exact ones (shorter side already 32)
RESIZED = [((48, 40), (40, 64)), ((40, 52), (50, 44))]
EXACT = [((32, 40), (36, 32)), ((32, 48), (44, 32)), ((32, 32), (32, 37))]


def _pairs(sizes, fmt, seed=0):
    return [(smooth_image(*sw, seed + 2 * i, fmt), smooth_image(*sl, seed + 2 * i + 1, fmt))
            for i, (sw, sl) in enumerate(sizes)]


def test_plan_draws_the_same_decisions_as_the_pil_path():
    """No DALI needed: the host-side plan replays prepare_pair's random draws exactly."""
    raw = _pairs(RESIZED + EXACT, "PNG") * 3
    plan_rng, pil_rng = np.random.default_rng(11), np.random.default_rng(11)
    flips = set()
    for winner, loser in raw:
        w_img, l_img = decode_image(winner), decode_image(loser)
        plan_w, plan_l, flip = plan_pair((w_img.shape[:2], l_img.shape[:2]), R, True, True, plan_rng)
        _, origs, crops = prepare_pair(w_img, l_img, R, True, True, pil_rng)
        assert [plan_w.original, plan_l.original] == [tuple(o) for o in origs.tolist()]
        assert [plan_w.crop, plan_l.crop] == [tuple(c) for c in crops.tolist()]
        flips.add(flip)
    assert flips == {True, False}
    assert plan_rng.random() == pil_rng.random()          # the same number of draws


@needs_dali
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("random_crop", [True, False])
def test_dali_pixels_match_the_pil_path(fmt, random_crop):
    from sail.engine.data.dali import DaliPairDecoder, prepare_pairs_dali

    sizes = RESIZED + EXACT
    raw = _pairs(sizes, fmt) * 2                              # twice: both flip states for the exact pairs
    decoder = DaliPairDecoder(R, "cpu", num_threads=1, max_batch_pairs=4)   # several DALI batches
    kept, pixels, origs, crops = prepare_pairs_dali(decoder, raw, random_crop, True, np.random.default_rng(3))
    assert kept == list(range(len(raw))) and pixels.shape == (len(raw), 2, 3, R, R)
    rng = np.random.default_rng(3)
    for i, (winner, loser) in enumerate(raw):
        want, want_origs, want_crops = prepare_pair(decode_image(winner), decode_image(loser), R, random_crop, True, rng)
        assert torch.equal(origs[i], want_origs) and torch.equal(crops[i], want_crops)
        diff = (pixels[i] - want).abs()
        if sizes[i % len(sizes)] in EXACT:
            # identical 8-bit values; (x - 127.5) / 127.5 vs x / 127.5 - 1 differ by float rounding
            assert diff.max() <= 1e-6, f"pair {i}: no resize, so the pixels must be identical"
        else:
            assert diff.mean() <= 0.004 and diff.max() <= 2 / 127.5 + 1e-6, (i, float(diff.mean()), float(diff.max()))
    assert pixels.min() >= -1 and pixels.max() <= 1


@needs_dali
def test_flip_is_shared_by_winner_and_loser():
    """An exact (unresized) symmetric check: with the flip forced on, both images are mirrored."""
    from sail.engine.data.dali import DaliPairDecoder, ImagePlan

    winner, loser = _pairs([EXACT[2]], "PNG")[0]
    decoder = DaliPairDecoder(R, "cpu", num_threads=1)
    plan_w = ImagePlan((32, 32), (32, 32), (0, 0))
    plan_l = ImagePlan((32, 37), (32, 37), (0, 2))
    plain = decoder.decode([(winner, loser)], [(plan_w, plan_l, False)])[0]
    mirrored = decoder.decode([(winner, loser)], [(plan_w, plan_l, True)])[0]
    torch.testing.assert_close(mirrored, plain.flip(-1), rtol=0, atol=0)


def _write_rows(path, pairs, captions):
    from tests.datagen import write_pickapic

    n = len(pairs)
    return write_pickapic(path, {"caption": captions, "jpg_0": [p[0] for p in pairs], "jpg_1": [p[1] for p in pairs],
                                 "label_0": [1.0 if i % 2 == 0 else 0.0 for i in range(n)],
                                 "label_1": [0.0 if i % 2 == 0 else 1.0 for i in range(n)]})


@needs_dali
def test_encode_pass_with_dali_matches_pil(tmp_path):
    """The pre-encoding pass (tiny SDXL: time ids) with data.decoder = dali vs pil; a pair with
    a corrupt header is skipped and counted on both paths."""
    from sail.engine.config import DataConfig
    from sail.engine.data.cache import PairCache
    from sail.engine.data.encode import encode_pickapic
    from sail.engine.models import build_components

    pairs = _pairs(RESIZED + EXACT, "JPEG", seed=20)
    pairs.insert(2, (b"\xff\xd8 not a jpeg", pairs[0][1]))
    data = _write_rows(tmp_path / "pairs.parquet", pairs, [f"w{i} w{i + 1}" for i in range(len(pairs))])
    comps = build_components("tiny-sdxl", 0)
    caches = {}
    for decoder in ("pil", "dali"):
        cfg = DataConfig(train=[data], resolution=R, random_crop=True, random_flip=True, decoder=decoder,
                         encode_batch_size=4, max_bad_fraction=0.5)   # 1 bad pair of 6: within 50%
        cache_dir = encode_pickapic(cfg, comps, tmp_path / decoder, seed=1, shard_size=4, progress=False)
        caches[decoder] = PairCache(cache_dir)
    pil, dali = caches["pil"], caches["dali"]
    assert len(pil) == len(dali) == len(pairs) - 1
    assert pil.meta["report"]["undecodable"] == dali.meta["report"]["undecodable"] == 1
    a, b = pil.load(range(len(pil))), dali.load(range(len(dali)))
    assert torch.equal(a.time_ids_w, b.time_ids_w) and torch.equal(a.time_ids_l, b.time_ids_l)
    assert a.time_ids_w[:, 2:4].abs().sum() > 0               # random crops happened (crop_top, crop_left)
    for key in ("latents_w", "latents_l"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x - y).abs().mean() <= 0.02 * x.abs().mean(), key


@needs_dali
def test_corrupt_body_falls_back_to_pil_for_the_shard(tmp_path, caplog):
    """A valid header over truncated data fails inside DALI: the shard is redone with PIL,
    which skips and counts exactly that pair."""
    from sail.engine.config import DataConfig
    from sail.engine.data.dali import prepare_shard_dali
    from sail.engine.data.pickapic import LoadReport, scan_pickapic

    pairs = _pairs(RESIZED, "PNG", seed=40)
    truncated = pairs[1][0][: len(pairs[1][0]) // 2]
    pairs[1] = (truncated, pairs[1][1])
    data = _write_rows(tmp_path / "pairs.parquet", pairs, ["w1 w2", "w3 w4"])
    refs, _ = scan_pickapic([data])
    report = LoadReport(kept=len(refs))
    cfg = DataConfig(train=[data], resolution=R, decoder="dali")
    items = prepare_shard_dali(refs, cfg, R, np.random.default_rng(0), report)
    assert [ref.row for ref, *_ in items] == [0]
    assert report.undecodable == 1 and report.undecodable_ids == [refs[1].row_id]
    assert "decoding the shard with PIL" in caplog.text
