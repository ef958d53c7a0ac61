"""Bootstrap intervals and win rates."""
from __future__ import annotations

import numpy as np
import pytest

from sail.engine.evaluation.stats import bootstrap_interval, win_indicator, win_rate


def test_bootstrap_matches_the_normal_interval_for_a_large_sample():
    values = np.random.default_rng(1).normal(2.0, 3.0, size=4000)
    mean, lo, hi = bootstrap_interval(values)
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert mean == pytest.approx(values.mean())
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.15 * se) and hi == pytest.approx(mean + 1.96 * se, abs=0.15 * se)


def test_bootstrap_is_seeded_and_degenerate_cases():
    values = np.arange(10.0)
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert bootstrap_interval(np.full(5, 3.5)) == (3.5, 3.5, 3.5)
    narrow = bootstrap_interval(values, level=0.5)
    wide = bootstrap_interval(values, level=0.99)
    assert wide[1] < narrow[1] < narrow[2] < wide[2]
    with pytest.raises(ValueError):
        bootstrap_interval(np.zeros(0))


def test_win_rate_on_hand_made_scores():
    model = np.array([3.0, 1.0, 2.0, 5.0])
    base = np.array([1.0, 2.0, 2.0, 4.0])
    assert win_indicator(model, base).tolist() == [1.0, 0.0, 0.5, 1.0]
    mean, lo, hi = win_rate(model, base)
    assert mean == 0.625 and 0.0 <= lo <= mean <= hi <= 1.0
    assert win_rate(base + 1, base)[:3] == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="baseline"):
        win_rate(model, base[:3])
