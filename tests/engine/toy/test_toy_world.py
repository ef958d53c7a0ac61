import numpy as np
import pytest

from sail.engine.configtree import load_dataclass
from sail.engine.toy.model import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer, tokenize
from sail.engine.toy.world import (BACKGROUNDS, COLOUR_NAMES, PALETTE, SHAPES, ToyWorldConfig, all_prompts, coverage,
                                   parse_prompt, render, render_prompts, sample_layout)


def test_vocabulary_and_prompts():
    prompts = all_prompts()
    assert len(COLOUR_NAMES) >= 10 and len(SHAPES) >= 6 and len(BACKGROUNDS) >= 6
    assert len(prompts) == len(set(prompts)) == 13 * 8 * 8 - 8 * 8  # every background is also a shape colour
    for p in prompts:
        a = parse_prompt(p)
        assert a.colour != a.background and a.prompt == p
    d = np.sqrt(((PALETTE[:, None] - PALETTE[None]) ** 2).sum(-1)) + np.eye(len(PALETTE)) * 1e9
    assert d.min() >= 80  # colours far apart: pixel classification is reliable


@pytest.mark.parametrize("bad, word", [("red circle on red", "background equals"), ("teal circle on black", "'teal'"),
                                       ("red blob on black", "'blob'"), ("red circle black", "expected")])
def test_parse_errors_name_the_problem(bad, word):
    with pytest.raises(ValueError, match=word):
        parse_prompt(bad)


def test_render_colours_and_geometry():
    img = render("red square on blue", size=8, position=(8, 8))
    red, blue = PALETTE[COLOUR_NAMES.index("red")], PALETTE[COLOUR_NAMES.index("blue")]
    is_red = (img == red.astype(np.uint8)).all(-1)
    assert is_red.sum() == 64 and is_red[4:12, 4:12].all()  # pixel-aligned 8x8 square, no partial pixels
    assert (img[~is_red] == blue.astype(np.uint8)).all()
    ring = render("white ring on black", size=12, position=(8, 8))
    assert (ring[8, 8] == PALETTE[COLOUR_NAMES.index("black")]).all()  # the hole shows the background
    assert (ring[8, 2] == PALETTE[COLOUR_NAMES.index("white")]).all()


def test_coverage_matches_analytic_area():
    cov = coverage([0, 3], [10.0, 10.0], [8.3, 7.6], [7.9, 8.2])
    assert cov.min() >= 0 and cov.max() <= 1
    assert abs(cov[0].sum() - np.pi * 25) < 1.5      # circle of diameter 10
    assert abs(cov[1].sum() - 50.0) < 1.5            # diamond of diagonal 10


def test_layout_keeps_margin_and_ranges():
    rng = np.random.default_rng(0)
    lay = sample_layout(rng, 500, 16, 6.0, 13.0, 1.0)
    assert lay.size.min() >= 6 and lay.size.max() <= 13
    assert (lay.cx - lay.size / 2 >= 1 - 1e-5).all() and (lay.cx + lay.size / 2 <= 15 + 1e-5).all()
    prompts = [all_prompts()[i] for i in rng.integers(len(all_prompts()), size=500)]
    imgs = render_prompts(prompts, lay)
    bgs = np.stack([PALETTE[parse_prompt(p).background] for p in prompts]).astype(np.uint8)
    border = np.concatenate([imgs[:, 0], imgs[:, -1], imgs[:, :, 0], imgs[:, :, -1]], axis=1)
    assert (border == bgs[:, None]).all()
    assert lay.cx.std() > 1.0 and lay.size.std() > 1.5  # the unnamed attributes really vary


def test_config_validation_names_the_field():
    cfg = ToyWorldConfig()
    assert cfg.num_seed_pairs == 384 and cfg.num_full_pairs == 16 * 384
    with pytest.raises(ValueError, match="^full_multiplier:"):
        ToyWorldConfig(images_per_seed_prompt=4, seed_pairs_per_prompt=2, full_multiplier=4)
    with pytest.raises(ValueError, match="^num_seed_prompts:"):
        ToyWorldConfig(num_seed_prompts=500)
    with pytest.raises(ValueError, match="^max_shape_size:"):
        ToyWorldConfig(max_shape_size=15.0)
    with pytest.raises(ValueError, match="^label_temperature:"):
        ToyWorldConfig(label_temperature=-1.0)
    assert load_dataclass(ToyWorldConfig, None, ["seed=3", "num_eval_prompts=100"]).num_eval_prompts == 100


def test_tokenizer_ids_and_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    ids = tokenize(tok, ["red circle on black", "", "Red circle on teal"])
    red, circle = tok.convert_tokens_to_ids(["red", "circle"])
    assert ids.shape == (3, 8)
    assert ids[0, :6].tolist() == [BOS_ID, red, circle, tok.convert_tokens_to_ids("on"),
                                   tok.convert_tokens_to_ids("black"), EOS_ID]
    assert ids[0, 6:].tolist() == [PAD_ID, PAD_ID]
    assert ids[1, :3].tolist() == [BOS_ID, EOS_ID, PAD_ID]
    assert ids[2, 1] == red and ids[2, 4] == UNK_ID  # lower-cased; unknown words map to <unk>
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.model_max_length == 8
    assert tokenize(loaded, ["red circle on black", ""]).tolist() == ids[:2].tolist()
