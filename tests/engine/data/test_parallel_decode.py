"""Decoding a shard's images on a thread pool (``data.decode_workers``) gives the serial path's
output exactly: the same pixels, sizes and crops, in the same order, the same skipped pairs, and
the random state left where the serial path leaves it."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch

from sail.engine.config import DataConfig
from sail.engine.data import encode
from sail.engine.data.images import prepare_pair
from sail.engine.data.pickapic import LoadReport, iter_pair_bytes, iter_pair_images, scan_pickapic
from tests.datagen import pickapic_rows, write_pickapic

R = 16


@pytest.fixture
def shard(tmp_path):
    """Two files of differently shaped images (both resized, along either side) with a broken
    image, a null cell, an empty cell and a truncated PNG (a valid header over half a body)."""
    tall = pickapic_rows(12, seed=0, size=(24, 20))
    wide = pickapic_rows(12, seed=1, size=(20, 30))
    tall["jpg_1"][2] = b"broken"
    tall["jpg_0"][5] = None
    wide["jpg_0"][3] = b""
    wide["jpg_1"][8] = wide["jpg_1"][8][: len(wide["jpg_1"][8]) // 2]
    paths = [write_pickapic(tmp_path / "tall.parquet", tall), write_pickapic(tmp_path / "wide.parquet", wide)]
    refs, _ = scan_pickapic(paths)
    return refs


def serial_path(refs, rng):
    """The pre-encoding pass before the pool: decode, then prepare_pair, one pair at a time."""
    report = LoadReport(kept=len(refs))
    items = [(ref, *prepare_pair(w, l, R, True, True, rng)) for ref, w, l in iter_pair_images(refs, report)]
    return items, report


@pytest.fixture
def shuffled_decoding(monkeypatch):
    """Decoding that finishes out of order (a random sleep per image), recording its threads."""
    threads, real = set(), encode.decode_resized
    delays = random.Random(0)

    def slow_decode(data, resolution):
        threads.add(threading.get_ident())
        time.sleep(delays.uniform(0, 0.004))
        return real(data, resolution)

    monkeypatch.setattr(encode, "decode_resized", slow_decode)
    return threads


@pytest.mark.parametrize("workers", [1, 4])
def test_pool_output_equals_the_serial_path(shard, shuffled_decoding, workers):
    serial_rng, rng = np.random.default_rng(5), np.random.default_rng(5)
    want, want_report = serial_path(shard, serial_rng)
    report = LoadReport(kept=len(shard))
    cfg = DataConfig(resolution=R, random_crop=True, random_flip=True, decode_workers=workers)
    got = list(encode.prepare_pairs_pil(iter_pair_bytes(shard), cfg, R, rng, report))
    assert [item[0] for item in got] == [item[0] for item in want]
    for (ref, px, orig, crop), (_, want_px, want_orig, want_crop) in zip(got, want):
        assert torch.equal(px, want_px) and torch.equal(orig, want_orig) and torch.equal(crop, want_crop), ref.row_id
    assert report.undecodable_ids == want_report.undecodable_ids == ["tall.parquet:2", "tall.parquet:5",
                                                                     "wide.parquet:3", "wide.parquet:8"]
    assert report.kept == want_report.kept == len(shard) - 4
    assert rng.random() == serial_rng.random()                  # as many draws, in the same order
    assert len({tuple(crop.flatten().tolist()) for *_, crop in want}) > 3     # random crops: the draws matter
    if workers == 1:
        assert shuffled_decoding == {threading.get_ident()}
    else:
        assert len(shuffled_decoding) > 1 and threading.get_ident() not in shuffled_decoding


def test_decode_workers_must_be_positive():
    with pytest.raises(ValueError, match="decode_workers: must be > 0, got 0"):
        DataConfig(decode_workers=0)


def test_encode_pass_is_the_same_with_any_number_of_workers(tmp_path, shard, one_thread):
    """The cache itself (latents, sources, skipped pairs) with 1 and 3 decoding threads."""
    from sail.engine.data.cache import PairCache
    from sail.engine.data.encode import encode_pickapic
    from sail.engine.models import build_components

    comps = build_components("tiny-sd15", seed=0)
    caches = []
    for workers in (1, 3):
        cfg = DataConfig(train=sorted({ref.file for ref in shard}), resolution=R, random_crop=True,
                         decode_workers=workers, max_bad_fraction=0.2, encode_batch_size=4)
        caches.append(PairCache(encode_pickapic(cfg, comps, tmp_path / f"w{workers}", seed=3, shard_size=8,
                                                progress=False)))
    one, three = caches
    assert one.sources == three.sources and len(one) == len(shard) - 4
    assert one.meta["report"]["undecodable_ids"] == three.meta["report"]["undecodable_ids"]
    a, b = one.load(range(len(one))), three.load(range(len(three)))
    assert torch.equal(a.latents_w, b.latents_w) and torch.equal(a.latents_l, b.latents_l)
