"""Reading a toy image back from its pixels: background, the shape (largest connected blob of
non-background pixels), its colour, soft coverage, area and centroid.

Shared by the oracle (what a "human" sees: how big and where) and the metrics (does the image
show the prompt). Everything is vectorised over the batch; the connected components come from
max-label propagation (8-connectivity, so the thin diagonals of a small "cross" stay one blob).
Stray pixels away from the shape form their own, smaller components and are ignored.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from sail.engine.toy.world import PALETTE

# Half the smallest distance between two palette colours (~82): a pixel at least half
# covered by the shape is foreground whatever the two colours are.
FOREGROUND_THRESHOLD = 40.0


@dataclass
class ShapeReadout:
    """What the pixels say about each image of a batch (B images of H x W)."""

    background: np.ndarray
    """[B, 3] float: median colour of the border ring."""
    foreground: np.ndarray
    """[B, 3] float: colour of the shape's most saturated pixels (background colour if no shape)."""
    mask: np.ndarray
    """[B, H, W] bool: the largest connected component of foreground pixels."""
    alpha: np.ndarray
    """[B, H, W] float in [0, 1]: estimated coverage, the component and its 1-pixel rim only."""
    area: np.ndarray
    """[B] float: soft area in pixels (sum of alpha)."""
    cx: np.ndarray
    """[B] float: alpha-weighted centroid x in pixel coordinates (image centre = W / 2)."""
    cy: np.ndarray
    """[B] float: centroid y."""

    @property
    def has_shape(self) -> np.ndarray:
        return self.mask.any(axis=(1, 2))


def _shifts(x: np.ndarray, fill) -> list[np.ndarray]:
    """The 9 views of x shifted by (-1, 0, 1) in both spatial axes (3x3 neighbourhood)."""
    h, w = x.shape[1:3]
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    return [p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of [B, H, W]."""
    return np.logical_or.reduce(_shifts(mask, False))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of each [H, W] mask in a [B, H, W] batch (ties: any one)."""
    b, h, w = mask.shape
    ids = np.arange(1, h * w + 1, dtype=np.int32).reshape(1, h, w)
    labels = np.where(mask, ids, 0)
    while True:  # propagate the max label through each component; at most its diameter in steps
        new = np.where(mask, np.maximum.reduce(_shifts(labels, 0)), 0)
        if np.array_equal(new, labels):
            break
        labels = new
    offset = (np.arange(b, dtype=np.int64) * (h * w + 1))[:, None, None]
    counts = np.bincount((labels + offset).ravel(), minlength=b * (h * w + 1)).reshape(b, h * w + 1)
    counts[:, 0] = 0  # background label
    best = counts.argmax(axis=1)
    return (labels == best[:, None, None]) & mask


def border_ring(h: int, w: int) -> np.ndarray:
    """bool [H, W]: the outermost pixels."""
    ring = np.zeros((h, w), dtype=bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    return ring


def _masked_median(values: np.ndarray, mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per-image median colour over masked pixels: values [B,N,3], mask [B,N] -> [B,3]."""
    v = np.where(mask[..., None], values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: images with no shape
        med = np.nanmedian(v, axis=1)
    return np.where(np.isnan(med), fallback, med)


def read_shapes(images: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> ShapeReadout:
    """Analyse uint8 images [B, H, W, 3] (see ShapeReadout)."""
    img = np.asarray(images, dtype=np.float32)
    b, h, w, _ = img.shape
    ring = border_ring(h, w)
    background = np.median(img[:, ring], axis=1)                                   # [B, 3]
    dist = np.linalg.norm(img - background[:, None, None], axis=-1)                # [B, H, W]
    mask = largest_component(dist > threshold)
    # Shape colour from its most saturated pixels: anti-aliased edges are blends with the background.
    far = mask & (dist >= 0.75 * np.where(mask, dist, 0).max(axis=(1, 2), keepdims=True))
    foreground = _masked_median(img.reshape(b, -1, 3), far.reshape(b, -1), background)
    axis = foreground - background
    norm2 = np.maximum((axis * axis).sum(-1), 1e-6)[:, None, None]
    proj = ((img - background[:, None, None]) * axis[:, None, None]).sum(-1) / norm2
    alpha = np.clip(proj, 0.0, 1.0) * dilate(mask)
    area = alpha.sum(axis=(1, 2))
    xs = np.arange(w, dtype=np.float32) + 0.5
    ys = np.arange(h, dtype=np.float32) + 0.5
    safe = np.maximum(area, 1e-6)
    cx = np.where(area > 0, (alpha.sum(axis=1) * xs).sum(-1) / safe, w / 2.0)
    cy = np.where(area > 0, (alpha.sum(axis=2) * ys).sum(-1) / safe, h / 2.0)
    return ShapeReadout(background, foreground, mask, alpha, area, cx, cy)


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour: [..., 3] -> [...] int."""
    d = ((np.asarray(rgb, dtype=np.float32)[..., None, :] - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)
