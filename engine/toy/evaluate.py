"""Evaluation of a pixel-space model folder on held-out prompts with fixed seeds.

Writes ``metrics.json`` (per-scorer mean and standard error, prompt fidelity and its
sub-rates, within-prompt diversity, counts, sampling settings) and a sample grid PNG.
The default protocol: every eval prompt x 10 seeds, DDIM 20 steps, CFG 1.5.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from sail.engine.config import SamplingConfig
from sail.engine.io import atomic_write, write_json
from sail.engine.toy.data import image_seed, make_splits, read_splits
from sail.engine.toy.metrics import mean_and_se, prompt_fidelity, within_prompt_diversity
from sail.engine.toy.model import load_toy_model, sample_images
from sail.engine.toy.scorers import world_scorer
from sail.engine.toy.world import DEFAULT_ORACLE, ToyWorldConfig

log = logging.getLogger(__name__)

EVAL_STREAM = 2  # seed stream of evaluation images (data.image_seed)


@dataclass
class EvalSettings:
    """How images are drawn for evaluation."""

    seeds_per_prompt: int = 10
    """Images per prompt, seeds fixed by (world seed, prompt index, image index)."""
    sampling: SamplingConfig = field(default_factory=lambda: ToyWorldConfig().sampling)
    """Sampler, steps, guidance and batch (default: the toy world's)."""
    world_seed: int = 0
    """Seed of the evaluation image seeds (the same for every model compared)."""
    grid_prompts: int = 12
    """Rows of the sample grid (first prompts), each showing up to 8 seeds."""
    precision: str = "fp32"
    """Weights of the sampled model: fp32, bf16 or fp16 (``eval.precision``, resolved)."""
    compile: bool = False
    """torch.compile the UNet (``eval.compile``)."""

    def __post_init__(self):
        if self.seeds_per_prompt < 1:
            raise ValueError(f"seeds_per_prompt: must be >= 1, got {self.seeds_per_prompt}")

    @classmethod
    def from_world(cls, cfg: ToyWorldConfig) -> "EvalSettings":
        return cls(seeds_per_prompt=cfg.eval_seeds_per_prompt, sampling=cfg.sampling, world_seed=cfg.seed)


def eval_prompts(cfg: ToyWorldConfig, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Held-out prompts: from the data folder's splits.json if given, else from the config."""
    if data_dir is not None and (Path(data_dir) / "splits.json").is_file():
        return read_splits(Path(data_dir) / "splits.json").eval
    return make_splits(cfg).eval


def score_images(images: np.ndarray, prompts: Sequence[str], scorers: dict[str, object]) -> dict[str, float]:
    """All metrics of a batch of images: per-scorer mean/se/std, fidelity, diversity, counts."""
    metrics: dict[str, float] = {"n_images": int(len(images)), "n_prompts": len(set(prompts))}
    for name, scorer in scorers.items():
        values = np.asarray(scorer(images, prompts), dtype=np.float64)
        mean, se = mean_and_se(values)
        metrics.update({f"{name}/mean": mean, f"{name}/se": se, f"{name}/std": float(values.std())})
    metrics.update(prompt_fidelity(images, prompts))
    metrics.update(within_prompt_diversity(images, prompts))
    return metrics


def save_grid(path: str | os.PathLike, images: np.ndarray, prompts: Sequence[str], rows: int, cols: int = 8,
              scale: int = 4, title: str | None = None) -> Path:
    """PNG grid: one row per prompt (first ``rows`` distinct prompts), up to ``cols`` images each,
    upscaled ``scale`` x (nearest) with the prompt written on the left."""
    from PIL import Image, ImageDraw

    order: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        order.setdefault(p, []).append(i)
    chosen = list(order.items())[:rows]
    h, w = images.shape[1:3]
    cell, label_w, top = h * scale + 4, 150, 18 if title else 4
    canvas = Image.new("RGB", (label_w + cols * cell, top + len(chosen) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0))
    for r, (prompt, idx) in enumerate(chosen):
        y = top + r * cell
        draw.text((4, y + cell // 2 - 6), prompt, fill=(0, 0, 0))
        for c, i in enumerate(idx[:cols]):
            tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + c * cell + 2, y + 2))
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def sample_data_parallel(model, prompts: list[str], seeds: list[int], sampling, ranks) -> np.ndarray | None:
    """``sample_images`` over the ranks: the images cut into the batches one process samples
    (``sampling.batch_size``), batch b on rank b mod W, gathered on rank 0 in order (the same
    batches, so the same images as one process); other ranks return None."""
    size = sampling.batch_size
    starts = list(range(0, len(seeds), size))
    mine = {b: sample_images(model, prompts[s:s + size], seeds[s:s + size], sampling)
            for b, s in enumerate(starts) if b % ranks.world_size == ranks.rank}
    parts = ranks.all_gather_object(mine)
    if not ranks.is_main:
        return None
    merged = {b: images for part in parts for b, images in part.items()}
    return np.concatenate([merged[b] for b in range(len(starts))])


def evaluate_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, prompts: Sequence[str],
                   settings: EvalSettings | None = None, scorers: dict[str, object] | None = None,
                   progress: bool = False, ranks=None) -> dict | None:
    """Sample ``settings.seeds_per_prompt`` images per prompt from the model folder, score them,
    write ``out_dir/metrics.json`` and ``out_dir/samples.png``; returns the metrics. With
    ``ranks`` of several processes, every rank samples its share and rank 0 alone scores,
    writes and returns the metrics (the others: None)."""
    start = time.time()
    settings = settings or EvalSettings()
    scorers = scorers if scorers is not None else {"oracle": world_scorer("oracle", DEFAULT_ORACLE)}
    from sail.engine.compilation import compile_module
    from sail.engine.strategy import DTYPES

    model = load_toy_model(model_dir, DTYPES[settings.precision])
    compile_module(model.unet, "the evaluated UNet", settings.compile)
    k = settings.seeds_per_prompt
    all_prompts = [p for p in prompts for _ in range(k)]
    seeds = [image_seed(settings.world_seed, EVAL_STREAM, i, j) for i in range(len(prompts)) for j in range(k)]
    if ranks is not None and ranks.world_size > 1:
        images = sample_data_parallel(model, all_prompts, seeds, settings.sampling, ranks)
        if images is None:
            return None
    else:
        images = sample_images(model, all_prompts, seeds, settings.sampling, progress=progress)
    metrics = score_images(images, all_prompts, scorers)
    metrics.update({"model": str(model_dir), "sampler": settings.sampling.sampler, "settings": asdict(settings),
                    "duration(s)": round(time.time() - start, 1)})
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", metrics)
    title = f"{Path(model_dir).name}: oracle {metrics.get('oracle/mean', float('nan')):.3f}, " \
            f"fidelity {metrics['fidelity/all']:.1%}"
    save_grid(out_dir / "samples.png", images, all_prompts, rows=settings.grid_prompts, title=title)
    log.info("evaluated %s on %d images in %.1f s", model_dir, len(images), metrics["duration(s)"])
    return metrics
