"""Bootstrap intervals and win rates over prompts (the papers' reporting forms)."""
from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def bootstrap_interval(values: np.ndarray, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` [n] and its percentile-bootstrap interval at ``level`` (prompts resampled
    with replacement ``samples`` times; seeded, so a table is reproducible)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values: expected a non-empty 1-d array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(values.mean()), float(lo), float(hi)


def win_indicator(model: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per prompt: 1 where the model's score beats the baseline's, 0.5 on a tie, 0 otherwise."""
    model, baseline = np.asarray(model, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if model.shape != baseline.shape:
        raise ValueError(f"win rate: {model.shape} scores against {baseline.shape} baseline scores")
    return np.where(model > baseline, 1.0, np.where(model == baseline, 0.5, 0.0))


def win_rate(model: np.ndarray, baseline: np.ndarray, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Fraction of prompts on which the model beats the baseline (ties half), with its bootstrap
    interval: the Diffusion-DPO paper's headline form, here per scorer instead of per human."""
    return bootstrap_interval(win_indicator(model, baseline), level, seed=seed)
