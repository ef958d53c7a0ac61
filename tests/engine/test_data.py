import math

import pytest
import torch

from sail.engine.config import DataConfig
from sail.engine.data.cache import PairCache, TrainSet, write_train_set
from sail.engine.data.encode import encode_pickapic
from sail.engine.data.images import ImageDecodeError, decode_image
from sail.engine.data.pickapic import DataError, load_pickapic, scan_pickapic
from sail.engine.models import build_components
from tests.datagen import pickapic_rows, write_pickapic


def test_winner_first_and_glob(tmp_path):
    cols = pickapic_rows(4)
    write_pickapic(tmp_path / "a.parquet", cols)
    write_pickapic(tmp_path / "b.parquet", pickapic_rows(2, seed=1))
    pairs, report = load_pickapic(str(tmp_path / "*.parquet"))
    assert report.kept == 6 and len(report.files) == 2
    # row 0 has label_0 = 1 -> jpg_0 wins; row 1 has label_0 = 0 -> jpg_1 wins
    assert pairs[0].winner == cols["jpg_0"][0] and pairs[0].loser == cols["jpg_1"][0]
    assert pairs[1].winner == cols["jpg_1"][1] and pairs[1].loser == cols["jpg_0"][1]
    assert pairs[0].row_id == "a.parquet:0"


def test_ties_dropped_and_counted(tmp_path):
    cols = pickapic_rows(5)
    cols["label_0"][2] = cols["label_1"][2] = 0.5
    cols["label_0"][4] = cols["label_1"][4] = 0.5
    pairs, report = load_pickapic(write_pickapic(tmp_path / "t.parquet", cols))
    assert report.ties == 2 and report.kept == 3 and len(pairs) == 3
    assert [p.row_id for p in pairs] == ["t.parquet:0", "t.parquet:1", "t.parquet:3"]


def test_corrupt_image_skipped_counted_and_reported(tmp_path):
    cols = pickapic_rows(4)
    cols["jpg_1"][1] = b"\xff\xd8 definitely not a jpeg"
    cols["jpg_0"][3] = b""
    path = write_pickapic(tmp_path / "c.parquet", cols)
    pairs, report = load_pickapic(path, max_bad_fraction=0.5)
    assert len(pairs) == 2 and report.undecodable == 2 and report.kept == 2
    assert report.undecodable_ids == ["c.parquet:1", "c.parquet:3"]
    assert "c.parquet:1" in report.summary()
    with pytest.raises(ImageDecodeError):
        decode_image(cols["jpg_1"][1])
    # 2 bad of 4 rows is above the default 1%: the data set is refused, the rows named
    with pytest.raises(DataError, match=r"2 of 4 rows are bad \(50.00%\), more than data.max_bad_fraction 1.00%.*c.parquet:1"):
        load_pickapic(path)
    with pytest.raises(DataError, match=r"c.parquet: row 1: undecodable image .*\(data.strict\)"):
        load_pickapic(path, max_bad_fraction=0.5, strict=True)


def test_missing_column_names_file_and_column(tmp_path):
    cols = pickapic_rows(2)
    del cols["label_1"]
    path = write_pickapic(tmp_path / "m.parquet", cols)
    with pytest.raises(DataError, match=r"m.parquet: missing column\(s\) \['label_1'\]"):
        scan_pickapic(path)


def test_malformed_rows_skipped_counted_and_named_below_the_threshold(tmp_path):
    """One unreadable label among 300 rows: skipped, counted, named with its field."""
    cols = pickapic_rows(300)
    cols["label_0"][7] = math.nan
    cols["label_1"][20] = 0.3
    cols["caption"][41] = None
    refs, report = scan_pickapic(write_pickapic(tmp_path / "n.parquet", cols))
    assert report.rows == 300 and report.malformed == 3 and report.kept == 297 == len(refs)
    assert report.malformed_ids == ["n.parquet:7 (field label_0: label is nan, expected 0, 0.5 or 1)",
                                    "n.parquet:20 (field label_1: label 0.3 not in (0, 0.5, 1))",
                                    "n.parquet:41 (field caption: expected a string, got None)"]
    assert {r.row for r in refs}.isdisjoint({7, 20, 41})
    assert "skipped 3 malformed rows" in report.summary() and "n.parquet:20" in report.summary()


def test_malformed_rows_above_the_threshold_are_an_error(tmp_path):
    cols = pickapic_rows(100)
    for row in (3, 50):
        cols["label_0"][row] = None
    path = write_pickapic(tmp_path / "n.parquet", cols)
    # 2 of 100 = 2%: above the default 1%, within 5%
    with pytest.raises(DataError, match=r"2 of 100 rows are bad \(2.00%\), more than data.max_bad_fraction 1.00%"):
        scan_pickapic(path)
    refs, report = scan_pickapic(path, max_bad_fraction=0.05)
    assert report.malformed == 2 and len(refs) == 98
    # one bad row is exactly 1%: not more than the threshold
    cols["label_0"][50] = 1.0
    refs, report = scan_pickapic(write_pickapic(tmp_path / "one.parquet", cols))
    assert report.malformed == 1 and len(refs) == 99


def test_strict_refuses_the_first_malformed_row_naming_file_row_and_field(tmp_path):
    cols = pickapic_rows(300)
    cols["label_1"][11] = 0.3
    cols["label_0"][40] = math.nan
    with pytest.raises(DataError, match=r"s.parquet: row 11: field label_1: label 0.3 not in \(0, 0.5, 1\) \(data.strict\)"):
        scan_pickapic(write_pickapic(tmp_path / "s.parquet", cols), strict=True)


def test_has_label_false_rows_are_dropped_as_unlabelled(tmp_path):
    """Policy: a row without a recorded vote is never a pair, whatever its label columns say."""
    cols = pickapic_rows(6)
    cols["has_label"][1] = cols["has_label"][4] = False
    refs, report = scan_pickapic(write_pickapic(tmp_path / "h.parquet", cols))
    assert report.unlabelled == 2 and report.malformed == 0 and [r.row for r in refs] == [0, 2, 3, 5]
    assert "2 unlabelled rows (has_label false)" in report.summary()
    cols["has_label"][2] = None          # neither true nor false: a malformed row
    refs, report = scan_pickapic(write_pickapic(tmp_path / "h2.parquet", cols), max_bad_fraction=0.5)
    assert report.malformed_ids == ["h2.parquet:2 (field has_label: expected true/false, got None)"]
    del cols["has_label"]                # shards without the column: every row counts as labelled
    refs, report = scan_pickapic(write_pickapic(tmp_path / "h3.parquet", cols))
    assert report.unlabelled == 0 and len(refs) == 6


def test_empty_caption_skipped(tmp_path):
    cols = pickapic_rows(3)
    cols["caption"][0] = "   "
    pairs, report = load_pickapic(write_pickapic(tmp_path / "e.parquet", cols))
    assert report.empty_captions == 1 and report.malformed == 0 and len(pairs) == 2


def test_glob_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        scan_pickapic(str(tmp_path / "nothing-*.parquet"))


def test_encode_cache_and_sdxl_time_ids(tmp_path):
    """Images of 24x20 (h x w) at resolution 16: resized to 19x16, centre crop at (1, 0)."""
    cols = pickapic_rows(5, size=(24, 20))
    cols["jpg_0"][3] = b"broken"
    path = write_pickapic(tmp_path / "x.parquet", cols)
    comps = build_components("tiny-sdxl", seed=0)
    cfg = DataConfig(train=[path], resolution=16, random_flip=False, encode_batch_size=3, max_bad_fraction=0.2)
    cache_dir = encode_pickapic(cfg, comps, tmp_path / "cache", shard_size=2, progress=False)
    cache = PairCache(cache_dir)
    assert len(cache) == 4 and cache.meta["report"]["undecodable"] == 1
    assert cache.meta["report"]["undecodable_ids"] == ["x.parquet:3"]
    batch = cache.load([0, 3, 1])
    assert batch.latents_w.shape == (3, 4, 8, 8)          # tiny VAE: factor 2
    assert batch.hidden.shape == (3, 16, 64)               # two encoders of 32 concatenated
    assert batch.pooled.shape == (3, 32)
    expected = torch.tensor([24.0, 20.0, 1.0, 0.0, 16.0, 16.0])
    assert torch.equal(batch.time_ids_w[0], expected) and torch.equal(batch.time_ids_l[2], expected)
    assert cache.sources[3] == "x.parquet:4"               # the broken row 3 was skipped
    # a train set mixing rows of the same cache, loaded in the requested order
    write_train_set(tmp_path / "train_set.parquet", ["cache"], [(0, 2), (0, 0)])
    ts = TrainSet.read(tmp_path / "train_set.parquet")
    both = ts.load([1, 0])
    assert torch.equal(both.latents_w[0], cache.load([0]).latents_w[0])
    assert torch.equal(both.latents_w[1], cache.load([2]).latents_w[0])


def test_encode_resumes_from_written_shards(tmp_path):
    path = write_pickapic(tmp_path / "r.parquet", pickapic_rows(6))
    comps = build_components("tiny-sd15", seed=0)
    cfg = DataConfig(train=[path], resolution=16)
    cache_dir = encode_pickapic(cfg, comps, tmp_path / "c1", shard_size=2, progress=False)
    first = PairCache(cache_dir).load(range(6))
    # lose the index and one shard: the pass rewrites only what is missing, identically
    (tmp_path / "c1" / "meta.json").unlink()
    (tmp_path / "c1" / "shard_00001.json").unlink()
    stamp = (tmp_path / "c1" / "shard_00000.safetensors").stat().st_mtime_ns
    encode_pickapic(cfg, comps, tmp_path / "c1", shard_size=2, progress=False)
    assert (tmp_path / "c1" / "shard_00000.safetensors").stat().st_mtime_ns == stamp
    again = PairCache(tmp_path / "c1").load(range(6))
    assert torch.equal(first.latents_w, again.latents_w) and torch.equal(first.hidden, again.hidden)


def test_encode_refuses_too_many_undecodable_pairs_and_strict_refuses_one(tmp_path):
    """Undecodable images are found only when decoding: the encode pass applies the threshold."""
    cols = pickapic_rows(5)
    cols["jpg_1"][2] = b"broken"
    path = write_pickapic(tmp_path / "u.parquet", cols)
    comps = build_components("tiny-sd15", seed=0)
    with pytest.raises(DataError, match=r"1 of 5 rows are bad \(20.00%\), more than data.max_bad_fraction 10.00%"):
        encode_pickapic(DataConfig(train=[path], resolution=16, max_bad_fraction=0.1), comps, tmp_path / "a",
                        shard_size=2, progress=False)
    assert not (tmp_path / "a" / "meta.json").exists()       # no complete cache was recorded
    with pytest.raises(DataError, match=r"undecodable image in pair u.parquet:2 \(data.strict\)"):
        encode_pickapic(DataConfig(train=[path], resolution=16, strict=True), comps, tmp_path / "b",
                        shard_size=2, progress=False)
    cache = PairCache(encode_pickapic(DataConfig(train=[path], resolution=16, max_bad_fraction=0.2), comps,
                                      tmp_path / "c", shard_size=2, progress=False))
    assert len(cache) == 4 and cache.meta["report"]["undecodable_ids"] == ["u.parquet:2"]
