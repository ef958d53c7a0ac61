import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

import sail.engine.toy.data as toy_data
from sail.engine.config import SamplingConfig
from sail.engine.data.images import decode_image
from sail.engine.toy.data import (PromptSplits, choose_pairs, ensure_toy_data, make_splits, read_splits,
                                  write_splits)
from sail.engine.toy.oracle import size_and_centre_score
from sail.engine.toy.world import ToyWorldConfig, all_prompts
from sail.engine.worlds import check_disjoint

PICKAPIC_COLUMNS = {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different", "model_0",
                    "model_1", "best_image_uid", "ranking_id", "user_id", "image_0_uid", "image_1_uid"}

TINY = ToyWorldConfig(num_seed_prompts=3, images_per_seed_prompt=4, seed_pairs_per_prompt=1, full_multiplier=6,
                      num_iterations=2, pool_prompts=2, num_eval_prompts=2, sampling=SamplingConfig(steps=2, guidance_scale=1.5, batch_size=64),
                      label_temperature=0.0)


def test_default_splits_disjoint_and_sized():
    cfg = ToyWorldConfig()
    s = make_splits(cfg)
    assert len(s.seed) == cfg.num_seed_prompts and len(s.eval) == cfg.num_eval_prompts >= 100
    assert [len(p) for p in s.pools] == [cfg.pool_prompts] * cfg.num_iterations
    named = s.named()
    assert list(named) == ["seed", "pool_1", "pool_2", "pool_3", "eval"]
    union = set().union(*map(set, named.values()))
    assert len(union) == sum(map(len, named.values())) and union <= set(all_prompts())
    assert make_splits(cfg).named() == named                           # deterministic
    assert make_splits(dataclasses.replace(cfg, seed=1)).eval != s.eval  # and seeded
    assert s.pool(2) == s.pools[1]


def test_check_disjoint_names_splits_and_prompt(tmp_path):
    with pytest.raises(ValueError, match=r"'pool_2' and 'eval' share 1 prompt\(s\), e.g. 'red ring on black'"):
        check_disjoint({"seed": ["a"], "pool_2": ["red ring on black", "b"], "eval": ["red ring on black"]})
    with pytest.raises(ValueError, match="'seed' lists prompt 'a' more than once"):
        check_disjoint({"seed": ["a", "a"]})
    splits = make_splits(TINY)
    write_splits(tmp_path / "splits.json", splits)
    assert read_splits(tmp_path / "splits.json") == splits
    bad = PromptSplits(seed=["x"], pools=[["y"]], eval=["x"])
    with pytest.raises(ValueError, match="'seed' and 'eval'"):
        write_splits(tmp_path / "bad.json", bad)


def test_choose_pairs_distinct_and_balanced():
    rng = np.random.default_rng(0)
    pairs = choose_pairs(12, 64, rng)
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 64 and (pairs[:, 0] != pairs[:, 1]).all()
    many = np.concatenate([choose_pairs(6, 15, rng) for _ in range(200)])
    assert abs((many[:, 0] < many[:, 1]).mean() - 0.5) < 0.02  # the column carries no information


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("toydata") / "data"
    return ensure_toy_data(out, TINY, tiny_model_dir), out


def test_ensure_builds_pickapic_sets(tiny_data):
    paths, _ = tiny_data
    seed, full = pq.read_table(paths.seed), pq.read_table(paths.full)
    assert PICKAPIC_COLUMNS <= set(seed.column_names) and PICKAPIC_COLUMNS <= set(full.column_names)
    assert seed.num_rows == 3 and full.num_rows == 3 * 6
    seed_prompts = set(read_splits(paths.splits).seed)
    f = full.to_pydict()
    assert set(f["caption"]) == seed_prompts
    assert set(seed.column("image_0_uid").to_pylist()) <= set(f["image_0_uid"])   # seed set within full set
    l0, l1 = np.array(f["label_0"]), np.array(f["label_1"])
    assert set(l0.tolist()) <= {0.0, 0.5, 1.0} and np.allclose(l0 + l1, 1.0)
    # label_temperature 0: the label is the oracle's own preference, recomputed from the stored PNGs
    img0 = np.stack([decode_image(b) for b in f["jpg_0"]])
    img1 = np.stack([decode_image(b) for b in f["jpg_1"]])
    assert img0.shape[1:] == (16, 16, 3)
    s0, s1 = size_and_centre_score(img0), size_and_centre_score(img1)
    np.testing.assert_allclose(s0, f["oracle_score_0"])
    expected = np.where(s0 > s1, 1.0, np.where(s0 < s1, 0.0, 0.5))
    np.testing.assert_array_equal(l0, expected)
    winners = [u0 if l == 1.0 else u1 for u0, u1, l in zip(f["image_0_uid"], f["image_1_uid"], l0) if l != 0.5]
    assert winners == [u for u, l in zip(f["best_image_uid"], l0) if l != 0.5]


def test_ensure_is_idempotent_and_rebuilds_when_stale(tiny_data, tiny_model_dir, monkeypatch):
    paths, out = tiny_data
    before = paths.full.read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("a valid folder must not be rebuilt")

    monkeypatch.setattr(toy_data, "sample_images", fail)
    assert ensure_toy_data(out, TINY, tiny_model_dir).full == paths.full  # valid: returns at once
    paths.seed.unlink()                                                     # incomplete: rebuilt
    monkeypatch.undo()
    ensure_toy_data(out, TINY, tiny_model_dir)
    assert paths.seed.is_file() and paths.full.read_bytes() == before       # deterministic rebuild
    other = dataclasses.replace(TINY, seed=5)                                # stale config: rebuilt
    ensure_toy_data(out, other, tiny_model_dir)
    assert read_splits(paths.splits) == make_splits(other)


def test_pickapic_reader_round_trip(tiny_data):
    from sail.engine.data.pickapic import load_pickapic

    paths, _ = tiny_data
    table = pq.read_table(paths.full).to_pydict()
    pairs, report = load_pickapic([str(paths.full)])
    ties = sum(1 for v in table["label_0"] if v == 0.5)
    assert ties > 0 and report.ties == ties and len(pairs) == len(table["label_0"]) - ties
    kept = [i for i, v in enumerate(table["label_0"]) if v != 0.5]
    for pair, i in zip(pairs, kept):
        winner = table["jpg_0"][i] if table["label_0"][i] == 1.0 else table["jpg_1"][i]
        assert pair.caption == table["caption"][i] and pair.winner == winner
