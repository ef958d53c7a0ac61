import numpy as np
import pytest

from sail.engine.toy.metrics import classify_images, mean_and_se, prompt_fidelity, within_prompt_diversity
from sail.engine.toy.world import (BACKGROUNDS, COLOUR_NAMES, SHAPES, Layout, all_prompts, parse_prompt, render_prompts,
                                   sample_layout)


@pytest.fixture(scope="module")
def renders():
    rng = np.random.default_rng(0)
    prompts = [all_prompts()[i] for i in rng.integers(len(all_prompts()), size=400)]
    return prompts, render_prompts(prompts, sample_layout(rng, len(prompts), 16, 6.0, 13.0, 1.0))


def test_fidelity_of_clean_renders(renders):
    prompts, images = renders
    f = prompt_fidelity(images, prompts)
    assert f["fidelity/background"] == 1.0 and f["fidelity/colour"] >= 0.99
    assert f["fidelity/shape"] >= 0.98 and f["fidelity/all"] >= 0.98


def _swap(prompt: str, what: str, rng) -> str:
    a = parse_prompt(prompt)
    colour, shape, bg = COLOUR_NAMES[a.colour], SHAPES[a.shape], COLOUR_NAMES[a.background]
    if what == "colour":
        colour = rng.choice([c for c in COLOUR_NAMES if c not in (colour, bg)])
    elif what == "shape":
        shape = rng.choice([s for s in SHAPES if s != shape])
    else:
        bg = rng.choice([b for b in BACKGROUNDS if b not in (bg, colour)])
    return f"{colour} {shape} on {bg}"


@pytest.mark.parametrize("what", ["colour", "shape", "background"])
def test_fidelity_catches_wrong_attributes(renders, what):
    prompts, images = renders
    rng = np.random.default_rng(1)
    wrong = [_swap(p, what, rng) for p in prompts]  # images show `prompts`, judged against `wrong`
    f = prompt_fidelity(images, wrong)
    assert f[f"fidelity/{what}"] <= 0.03
    assert f["fidelity/all"] <= 0.03
    others = [k for k in ("colour", "shape", "background") if k != what]
    assert all(f[f"fidelity/{k}"] >= 0.98 for k in others)


def test_no_shape_counts_as_wrong():
    blank = np.full((3, 16, 16, 3), 128, np.uint8)
    read = classify_images(blank)
    assert (read.shape == -1).all() and (read.colour == -1).all()
    assert read.background.tolist() == [COLOUR_NAMES.index("gray")] * 3
    assert prompt_fidelity(blank, ["red circle on gray"] * 3)["fidelity/all"] == 0.0


def test_diversity():
    prompts = ["red circle on black"] * 6 + ["blue ring on white"] * 6
    same = Layout(np.full(12, 9.0, np.float32), np.full(12, 8.0, np.float32), np.full(12, 8.0, np.float32))
    d0 = within_prompt_diversity(render_prompts(prompts, same), prompts)
    assert d0["diversity/pairwise_rms"] == pytest.approx(0.0, abs=1e-6)
    assert d0["diversity/position_std(px)"] == pytest.approx(0.0, abs=1e-5)
    assert d0["diversity/size_std(px)"] == pytest.approx(0.0, abs=1e-5)
    cx = np.linspace(5, 11, 12).astype(np.float32)
    d1 = within_prompt_diversity(render_prompts(prompts, Layout(same.size, cx, same.cy)), prompts)
    # centres spread along x only: the std pooled over x and y is std(x) / sqrt(2) in each group
    assert d1["diversity/position_std(px)"] == pytest.approx(np.std(cx[:6]) / np.sqrt(2), rel=0.03)
    assert d1["diversity/pairwise_rms"] > 0.1


def test_mean_and_se():
    mean, se = mean_and_se(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
