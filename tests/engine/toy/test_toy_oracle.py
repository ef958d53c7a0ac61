import numpy as np
import pytest

from sail.engine.scorers import load_scorer
from sail.engine.toy.oracle import (EMPTY_SCORE, bradley_terry_labels, preference_probability,
                                    size_and_centre_score)
from sail.engine.toy.vision import read_shapes
from sail.engine.toy.world import PALETTE, render


def _score(*images):
    return size_and_centre_score(np.stack(images), None)


def test_prefers_large_and_centred():
    small, large = render("red circle on black", 6, (8, 8)), render("red circle on black", 12, (8, 8))
    centred, corner = render("blue square on white", 7, (8, 8)), render("blue square on white", 7, (4.5, 11.5))
    s = _score(small, large, centred, corner)
    assert s[1] > s[0] + 0.2                      # sqrt(area) / 16 grows by ~ (10.6 - 5.3) / 16
    assert s[2] > s[3] + 0.2                      # 4.9 px off-centre costs 0.5 * 4.9 / 8
    blank = np.zeros((16, 16, 3), np.uint8) + PALETTE[0].astype(np.uint8)
    assert _score(blank)[0] == EMPTY_SCORE


def test_readout_measures_area_and_centroid():
    r = read_shapes(np.stack([render("green square on black", 8, (6.0, 9.5)),
                              render("yellow circle on purple", 10, (8.25, 7.75))]))
    np.testing.assert_allclose(r.area, [64.0, np.pi * 25], atol=1.0)
    np.testing.assert_allclose(r.cx, [6.0, 8.25], atol=0.05)
    np.testing.assert_allclose(r.cy, [9.5, 7.75], atol=0.05)


def test_border_contact_is_penalised():
    inside = render("red bar on black", 10, (8, 8))
    touching = inside.copy()
    touching[:, 0] = PALETTE[0].astype(np.uint8)  # the shape's colour bleeding onto the left border column
    touching[:, 1] = PALETTE[0].astype(np.uint8)
    touching[:, 2] = PALETTE[0].astype(np.uint8)
    s = _score(inside, touching)
    assert s[1] < s[0] - 0.5


def test_robust_to_stray_pixels():
    rng = np.random.default_rng(0)
    images, stray = [], []
    for shape in ("circle", "triangle", "cross", "ring"):
        img = render(f"white {shape} on blue", 7, (9, 9))
        images.append(img)
        noisy = img.copy()
        for y, x in [(1, 1), (1, 4), (3, 2), (14, 2), (2, 14)]:  # >= 2 px away from the shape
            noisy[y, x] = PALETTE[rng.integers(len(PALETTE))]
        stray.append(noisy)
    clean, dirty = _score(*images), _score(*stray)
    np.testing.assert_allclose(dirty, clean, atol=1e-9)
    # a stray pixel touching the shape does join it, but moves the score only a little
    joined = images[0].copy()
    joined[5, 9] = PALETTE[0]
    assert abs(_score(joined)[0] - clean[0]) < 0.02


def test_bradley_terry_deterministic_and_ties():
    rng = np.random.default_rng(0)
    a, b = np.array([0.3, 0.1, 0.2, 0.2]), np.array([0.1, 0.3, 0.2, 0.2000001])
    np.testing.assert_array_equal(bradley_terry_labels(a, b, 0.0, rng), [1.0, 0.0, 0.5, 0.0])
    assert (bradley_terry_labels(np.full(50, 0.4), np.full(50, 0.4), 0.1, rng) == 0.5).all()
    # within the tie margin: a tie; just outside it: a decided label
    near = bradley_terry_labels(np.array([0.504, 0.496, 0.506, 0.49]), np.full(4, 0.5), 0.0, rng, tie_margin=0.005)
    np.testing.assert_array_equal(near, [0.5, 0.5, 1.0, 0.0])


@pytest.mark.parametrize("gap, temperature", [(0.05, 0.05), (-0.02, 0.05), (0.1, 0.2)])
def test_bradley_terry_statistics(gap, temperature):
    n = 40000
    rng = np.random.default_rng(1)
    labels = bradley_terry_labels(np.full(n, 0.5 + gap), np.full(n, 0.5), temperature, rng)
    p = 1.0 / (1.0 + np.exp(-gap / temperature))
    se = np.sqrt(p * (1 - p) / n)
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert abs(labels.mean() - p) < 4 * se
    np.testing.assert_allclose(preference_probability(0.5 + gap, 0.5, temperature), p)


def test_load_scorer():
    fn = load_scorer("sail.engine.toy.oracle:size_and_centre_score")
    img = render("red circle on black", 9, (8, 8))[None]
    assert fn(img, ["red circle on black"])[0] == size_and_centre_score(img)[0]
    for bad, msg in [("sail.engine.toy.oracle", "module:function"), ("sail.engine.nope:f", "cannot import"),
                     ("sail.engine.toy.oracle:nope", "no callable")]:
        with pytest.raises(ValueError, match=msg):
            load_scorer(bad)


def test_second_taste_prefers_small_and_high_and_disagrees_with_the_default():
    from sail.engine.toy.oracle import small_and_high_score

    small_high, large_centred = render("red circle on black", 6, (8, 4)), render("red circle on black", 12, (8, 8))
    small_low = render("red circle on black", 6, (8, 12))
    images = np.stack([small_high, large_centred, small_low])
    second, default = small_and_high_score(images), size_and_centre_score(images)
    assert second[0] > second[1] + 0.1 and second[0] > second[2] + 0.2     # small and high wins
    assert default[1] > default[0]                                          # the default prefers the large one
    blank = np.zeros((1, 16, 16, 3), np.uint8) + PALETTE[0].astype(np.uint8)
    assert small_and_high_score(blank)[0] == EMPTY_SCORE
    assert load_scorer("sail.engine.toy.oracle:small_and_high_score") is small_and_high_score
