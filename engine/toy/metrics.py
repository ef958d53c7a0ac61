"""Pixel metrics of toy images: oracle score, prompt fidelity and within-prompt diversity.

Fidelity reads the three prompted attributes back from the pixels:
- background: nearest palette colour to the median of the border ring;
- colour: nearest palette colour to the shape's most saturated pixels;
- shape: best soft-IoU (Tanimoto) match of the shape's coverage map against a bank of
  rendered templates of every shape at sizes and positions on a half-pixel grid.
An image with no shape blob gets colour and shape wrong.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sail.engine.toy.vision import nearest_colour, read_shapes
from sail.engine.toy.world import SHAPES, coverage, parse_prompt

TEMPLATE_STEP = 0.5     # grid of template sizes and centres, pixels
TEMPLATE_MIN_SIZE = 4.0
MATCH_CHUNK = 256       # images per template-matching matmul (bounds memory: chunk x templates floats)


@functools.lru_cache(maxsize=4)
def template_bank(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Soft coverage maps of every shape at every size / centre of the grid, inside the image.

    Returns (templates float32 [M, H*W], shape id [M]); built once per image size (~1 s).
    """
    maps, ids = [], []
    for shape in range(len(SHAPES)):
        for size in np.arange(TEMPLATE_MIN_SIZE, image_size + 1e-6, TEMPLATE_STEP):
            centres = np.arange(size / 2.0, image_size - size / 2.0 + 1e-6, TEMPLATE_STEP)
            cx, cy = (a.ravel() for a in np.meshgrid(centres, centres))
            n = cx.size
            maps.append(coverage(np.full(n, shape), np.full(n, size), cx, cy, image_size, supersample=2)
                        .reshape(n, -1))
            ids.append(np.full(n, shape))
    return np.concatenate(maps).astype(np.float32), np.concatenate(ids)


def match_shapes(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best template per shape for coverage maps [B, H, W] -> (shape id [B], best soft IoU [B]).

    Soft IoU (Tanimoto) <a, t> / (|a|^2 + |t|^2 - <a, t>) equals the IoU on binary maps and
    is one matmul for the whole bank.
    """
    b, h, w = alpha.shape
    bank, bank_ids = template_bank(h)
    bank_sq = (bank * bank).sum(1)
    starts = np.searchsorted(bank_ids, np.arange(len(SHAPES)))  # the bank is grouped by shape, in order
    flat = alpha.reshape(b, -1).astype(np.float32)
    best_iou = np.zeros((b, len(SHAPES)), dtype=np.float32)
    for lo in range(0, b, MATCH_CHUNK):
        a = flat[lo:lo + MATCH_CHUNK]
        dot = a @ bank.T
        iou = dot / np.maximum((a * a).sum(1, keepdims=True) + bank_sq[None] - dot, 1e-6)
        best_iou[lo:lo + MATCH_CHUNK] = np.maximum.reduceat(iou, starts, axis=1)
    return best_iou.argmax(1), best_iou.max(1)


@dataclass
class Readback:
    """Attributes read from the pixels of a batch: palette / shape indices [B] (-1: no shape)."""

    background: np.ndarray
    colour: np.ndarray
    shape: np.ndarray
    shape_iou: np.ndarray


def classify_images(images: np.ndarray) -> Readback:
    """Read background, shape colour and shape of uint8 images [B, H, W, 3]."""
    r = read_shapes(images)
    has = r.has_shape
    shape, iou = match_shapes(r.alpha)
    return Readback(background=nearest_colour(r.background), colour=np.where(has, nearest_colour(r.foreground), -1),
                    shape=np.where(has, shape, -1), shape_iou=np.where(has, iou, 0.0))


def prompt_fidelity(images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose background, colour, shape (and all three) match their prompt."""
    bg, colour, shape = _matches(images, prompts)
    return {"fidelity/background": float(bg.mean()), "fidelity/colour": float(colour.mean()),
            "fidelity/shape": float(shape.mean()), "fidelity/all": float((bg & colour & shape).mean())}


def fidelity_per_image(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """1.0 where an image's background, colour and shape all match its prompt, else 0.0 (the
    scorer form of ``fidelity/all``)."""
    bg, colour, shape = _matches(images, prompts)
    return (bg & colour & shape).astype(np.float64)


def _matches(images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(images) != len(prompts):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(images)} images")
    attrs = [parse_prompt(p) for p in prompts]
    read = classify_images(images)
    return (read.background == np.array([a.background for a in attrs]),
            read.colour == np.array([a.colour for a in attrs]), read.shape == np.array([a.shape for a in attrs]))


def _groups(prompts: Sequence[str]) -> list[np.ndarray]:
    rows = defaultdict(list)
    for i, p in enumerate(prompts):
        rows[p].append(i)
    return [np.array(r) for r in rows.values() if len(r) > 1]


def within_prompt_diversity(images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """Spread among images of the same prompt, averaged over prompts with >= 2 images.

    pairwise_rms: mean over pairs of the RMS pixel difference (pixels scaled to [0, 1]);
    position_std(px) / size_std(px): std of the blob centroid (x and y pooled) and of
    sqrt(area), i.e. how much the unnamed attributes still vary.
    """
    groups = _groups(prompts)
    if not groups:
        return {"diversity/pairwise_rms": float("nan"), "diversity/position_std(px)": float("nan"),
                "diversity/size_std(px)": float("nan")}
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1) / 255.0
    r = read_shapes(images)
    side = np.sqrt(r.area)
    rms, pos, size = [], [], []
    for g in groups:
        xg = x[g]
        sq = (xg * xg).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None] - 2 * xg @ xg.T, 0.0) / x.shape[1]
        iu = np.triu_indices(len(g), 1)
        rms.append(np.sqrt(d2[iu]).mean())
        pos.append(np.sqrt(0.5 * (r.cx[g].var() + r.cy[g].var())))
        size.append(side[g].std())
    return {"diversity/pairwise_rms": float(np.mean(rms)), "diversity/position_std(px)": float(np.mean(pos)),
            "diversity/size_std(px)": float(np.mean(size))}


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()) if values.size else float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))
