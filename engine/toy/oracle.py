"""The toy world's "human": a preference score computed from pixels, and noisy pairwise labels.

Default taste (``size_and_centre_score``): large, centred shapes that stay clear of the image
border. It is measured on the largest connected blob of non-background pixels, so stray
pixels elsewhere do not move it, and it ignores the prompt: it rewards how the image looks,
which is what the base model varies on (size and position are never named in prompts).
Prompt fidelity is measured separately (engine/toy/metrics.py), so an aligned model that
trades fidelity for score is visible.

Any scorer ``(images_uint8 [B, H, W, 3], prompts) -> float array [B]`` can replace it,
named by a ``"module:function"`` string (``load_scorer``).

Labels follow Bradley-Terry: ``p(a beats b) = sigmoid((s_a - s_b) / T)``; T = 0 gives
deterministic labels, and exactly equal scores give a tie (0.5) at any T.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from sail.engine.toy.vision import border_ring, read_shapes

CENTRE_WEIGHT = 0.5   # one unit of size term = two units of centre offset
BORDER_WEIGHT = 1.0
EMPTY_SCORE = -1.0    # no shape at all: below any image with a shape

ScoreFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def size_and_centre_score(images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
    """Oracle score of uint8 images [B, H, W, 3] -> float64 [B] (higher is preferred).

    score = sqrt(area) / W  -  0.5 * |centroid - centre| / (W / 2)  -  (coverage on the border ring) / W,
    area and centroid measured on the largest blob (soft coverage); an image with no blob
    scores -1. Over the pretraining distribution (shapes of 6-13 px anywhere) the score lies
    in about [0, 0.72]; ``prompts`` is accepted for the common scorer signature and unused.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [B, H, W, 3], got shape {images.shape}")
    _, h, w, _ = images.shape
    r = read_shapes(images)
    size_term = np.sqrt(r.area) / w
    centre_term = np.hypot(r.cx - w / 2.0, r.cy - h / 2.0) / (w / 2.0)
    border_term = (r.alpha * border_ring(h, w)).sum(axis=(1, 2)) / w
    score = size_term - CENTRE_WEIGHT * centre_term - BORDER_WEIGHT * border_term
    return np.where(r.has_shape, score, EMPTY_SCORE).astype(np.float64)


def small_and_high_score(images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
    """A second taste, opposed to the default on size (``toy.world.oracle =
    "sail.engine.toy.oracle:small_and_high_score"``): small shapes in the upper part of the
    image, horizontally centred, clear of the border. uint8 [B, H, W, 3] -> float64 [B]:

    score = 1 - 0.5 sqrt(area) / W - 0.5 |cy - H/4| / (H/2) - 0.5 |cx - W/2| / (W/2) - (border coverage) / W,

    on the same largest-blob readout as ``size_and_centre_score``; no blob scores -1. It checks
    that settings chosen on the default taste do not only work for that taste (docs/sail_toy.md).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [B, H, W, 3], got shape {images.shape}")
    _, h, w, _ = images.shape
    r = read_shapes(images)
    score = (1.0 - 0.5 * np.sqrt(r.area) / w - 0.5 * np.abs(r.cy - h / 4.0) / (h / 2.0)
             - 0.5 * np.abs(r.cx - w / 2.0) / (w / 2.0) - BORDER_WEIGHT * (r.alpha * border_ring(h, w)).sum(axis=(1, 2)) / w)
    return np.where(r.has_shape, score, EMPTY_SCORE).astype(np.float64)


def score(images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
    """The default oracle (``size_and_centre_score``)."""
    return size_and_centre_score(images, prompts)


def preference_probability(score_a: np.ndarray, score_b: np.ndarray, temperature: float) -> np.ndarray:
    """Bradley-Terry p(a beats b) = sigmoid((s_a - s_b) / T); T = 0: 1, 0, or 0.5 on equality."""
    diff = np.asarray(score_a, dtype=np.float64) - np.asarray(score_b, dtype=np.float64)
    if temperature == 0:
        return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return 0.5 * (1.0 + np.tanh(diff / (2.0 * temperature)))  # = sigmoid(diff / T), overflow-free


def bradley_terry_labels(score_a: np.ndarray, score_b: np.ndarray, temperature: float,
                         rng: np.random.Generator, tie_margin: float = 0.0) -> np.ndarray:
    """Noisy label of image a per pair: 1.0 (a wins), 0.0 (b wins) or 0.5 (a tie).

    A tie is a pair whose scores differ by at most ``tie_margin`` (the "human" cannot tell them
    apart, as in Pick-a-Pic's no-preference votes); equal scores are always a tie. One uniform
    draw per pair whatever T is, so changing T does not reshuffle the other draws.
    """
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if tie_margin < 0:
        raise ValueError(f"tie_margin: must be >= 0, got {tie_margin}")
    score_a, score_b = np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)
    p = preference_probability(score_a, score_b, temperature)
    u = rng.random(p.shape)
    label = (u < p).astype(np.float64)
    return np.where(np.abs(score_a - score_b) <= tie_margin, 0.5, label)
