"""Generate with fixed seeds, score with every configured scorer, tabulate: the one evaluation
path of ``sail evaluate`` and of a run's evaluate stage.

Per (model, benchmark), the prompts are cut into chunks; chunk c belongs to rank c mod world
size. A chunk is generated (``eval.seed``-fixed seeds per (benchmark, prompt, image)), its
images are written as PNG files, scored, and its rows are written as one parquet file, last
and atomically: a killed evaluation resumes at the first chunk without a file. Rank 0 then
writes, under ``out``:

    scores.parquet        one row per image: model, benchmark, prompt, category, image file, seed, scores
    table.json, table.md  per benchmark x scorer x model: mean over prompts and a bootstrap 95%
                          interval; per category; with a baseline, per-prompt win rates
    grid_<benchmark>.png  the first prompts, one column per model
    scores_vs_model.png   every scorer against the models in order (a run's base, iter_000, ...)
    <model>/<benchmark>/  images/ and chunks/

Learned scorers (engine/evaluation/scorers.py) score real models; a pixel-space toy model is
scored by the toy world's ground truth: ``oracle``, ``fidelity`` (per image) and ``diversity``
(per prompt, over its images: set ``eval.seeds_per_prompt`` >= 2).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sail.engine.config import EvalConfig, SamplingConfig
from sail.engine.errors import InputError
from sail.engine.evaluation.prompts import PromptSet
from sail.engine.evaluation.stats import bootstrap_interval, win_indicator, win_rate
from sail.engine.io import atomic_write, read_json, write_json, write_parquet
from sail.engine.ranks import Ranks

log = logging.getLogger(__name__)

TOY_SCORERS = ("oracle", "fidelity", "diversity")
GRID_PROMPTS = 8


@dataclass(frozen=True)
class EvalModel:
    """A model folder to evaluate and its label in the tables."""

    label: str
    path: str

    @property
    def pixel_space(self) -> bool:
        """No VAE: the samples are the images (the toy world's models)."""
        return not (Path(self.path) / "vae").is_dir()


def protocol(model: EvalModel, cfg: EvalConfig) -> tuple[SamplingConfig, int]:
    """Sampler and images per prompt: ``eval.sampling`` / ``eval.seeds_per_prompt`` if set, else the
    papers' protocol (one image per prompt; SD1.5 DDPM 50 steps CFG 7.5, SDXL DDIM 20 CFG 5) or,
    for a pixel-space toy model, the toy world's (DDIM 20, CFG 1.5, 10 images per prompt)."""
    from sail.engine.models import detect_kind

    if model.pixel_space:
        from sail.engine.toy.world import ToyWorldConfig

        toy = ToyWorldConfig()
        return cfg.sampling or toy.sampling, cfg.seeds_per_prompt or toy.eval_seeds_per_prompt
    k = cfg.seeds_per_prompt or 1
    if cfg.sampling is not None:
        return cfg.sampling, k
    if detect_kind(Path(model.path)) == "sdxl":
        return SamplingConfig(sampler="ddim", steps=20, guidance_scale=5.0, batch_size=8), k
    return SamplingConfig(sampler="ddpm", steps=50, guidance_scale=7.5, batch_size=8), k


def models_of(path: str) -> list[EvalModel]:
    """A model folder -> [it]; a run directory -> its base model and each iteration's model."""
    from sail.engine.layout import RunLayout

    p = Path(path)
    if (p / "model_index.json").is_file() or (p / "unet").is_dir():
        return [EvalModel(p.parent.name if p.name == "model" else p.name, str(p))]
    lay = RunLayout(p)
    iters = [d for d in lay.iterations() if (d / "model" / "unet").is_dir()]
    if not iters:
        raise InputError(f"--model: {p} is neither a diffusers model folder nor a run directory with iter_*/model")
    models = []
    if lay.base_model.is_dir():
        models.append(EvalModel("base", str(lay.base_model)))
    elif lay.config.is_file():
        from sail.engine.config import ModelConfig
        from sail.engine.configtree import build_dataclass

        model_cfg = build_dataclass(ModelConfig, read_json(lay.config)["model"], str(lay.config), "model")
        if model_cfg.resolved_path():
            models.append(EvalModel("base", model_cfg.resolved_path()))
    return models + [EvalModel(d.name, str(d / "model")) for d in iters]


class Harness:
    """Evaluates models on prompt sets with named scorers (loaded once per process, lazily)."""

    def __init__(self, cfg: EvalConfig, out: Path, ranks: Ranks, scorers: list[str], *,
                 toy_oracle: str | None = None, progress: bool = True, loaded: dict | None = None):
        self.cfg, self.out, self.ranks, self.names = cfg, Path(out), ranks, list(scorers)
        self.toy_oracle, self.progress = toy_oracle, progress
        self._scorers = loaded

    # ---- per (model, benchmark): chunks on this rank --------------------------------------
    def run(self, model: EvalModel, bench: PromptSet) -> None:
        sampling, k = protocol(model, self.cfg)
        folder = self.out / model.label / bench.name
        per_chunk = max(1, self.cfg.chunk_images // k)
        chunks = [range(s, min(s + per_chunk, len(bench.prompts))) for s in range(0, len(bench.prompts), per_chunk)]
        mine = [(c, rows) for c, rows in enumerate(chunks) if c % self.ranks.world_size == self.ranks.rank
                and not (folder / "chunks" / f"{c:05d}.parquet").is_file()]
        if not mine:
            return
        comps = self._load(model)
        from tqdm import tqdm

        for c, rows in tqdm(mine, desc=f"{model.label}/{bench.name}", disable=not (self.progress and self.ranks.is_main)):
            prompts = [bench.prompts[p] for p in rows]
            seeds = [bench.seed(self.cfg.seed, p, j) for p in rows for j in range(k)]
            images = render(comps, model.path, prompts, seeds, sampling)
            self._write_chunk(folder, c, bench, rows, k, seeds, images)
        del comps
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, model: EvalModel):
        from sail.engine.models import load_components
        from sail.engine.strategy import DTYPES, resolve_precision

        from sail.engine.compilation import compile_module

        dtype = DTYPES[resolve_precision(self.cfg.precision, self.ranks.device)]
        comps = load_components(model.path, dtype=dtype)
        compile_module(comps.unet.to(self.ranks.device).eval(), "the evaluated UNet", self.cfg.compile)
        for enc in comps.text_encoders:
            enc.to(self.ranks.device)
        if comps.vae is not None:   # decoded in fp32: SDXL's VAE overflows in fp16
            comps.vae.to(self.ranks.device, torch.float32)
        return comps

    def _write_chunk(self, folder: Path, c: int, bench: PromptSet, rows: range, k: int, seeds: list[int],
                     images: np.ndarray) -> None:
        from PIL import Image

        (folder / "images").mkdir(parents=True, exist_ok=True)
        prompts = [bench.prompts[p] for p in rows for _ in range(k)]
        files = [f"images/{p:05d}_{j:02d}.png" for p in rows for j in range(k)]
        for name, image in zip(files, images):
            atomic_write(folder / name, lambda tmp, im=image: Image.fromarray(im).save(tmp, format="PNG"))
        cols = {"prompt_idx": [p for p in rows for _ in range(k)], "image_idx": [j for _ in rows for j in range(k)],
                "prompt": prompts, "category": [bench.categories[p] if bench.categories else "" for p in rows
                                                for _ in range(k)],
                "image": files, "seed": seeds}
        for name, values in self.score(images, prompts, k).items():
            cols[name] = values.tolist()
        write_parquet(folder / "chunks" / f"{c:05d}.parquet", cols)

    def score(self, images: np.ndarray, prompts: list[str], k: int) -> dict[str, np.ndarray]:
        """Every scorer's value per image (a per-prompt metric is repeated on its prompt's rows)."""
        out = {}
        for name, scorer in self.scorers().items():
            if name == "diversity":
                out[name] = _diversity(images, k)
            else:
                out[name] = np.asarray(scorer(images, prompts), dtype=np.float64)
        return out

    def scorers(self) -> dict:
        if self._scorers is None:
            self._scorers = load_named_scorers(self.names, self.cfg, self.ranks.device, self.toy_oracle)
        return self._scorers


def load_named_scorers(names: list[str], cfg: EvalConfig, device: torch.device, toy_oracle: str | None) -> dict:
    """Scorers by name: the toy world's (oracle, fidelity, diversity) or the learned ones
    configured in ``eval.scorers``."""
    from sail.engine.evaluation.scorers import load_scorers
    from sail.engine.toy.metrics import fidelity_per_image
    from sail.engine.toy.scorers import world_scorer
    from sail.engine.toy.world import DEFAULT_ORACLE

    out, learned = {}, {}
    for name in names:
        if name == "oracle":
            out[name] = world_scorer("oracle", toy_oracle or DEFAULT_ORACLE)
        elif name == "fidelity":
            out[name] = fidelity_per_image
        elif name == "diversity":
            out[name] = None
        elif name in cfg.scorers:
            learned[name] = cfg.scorers[name]
        else:
            raise InputError(f"--scorers: {name!r} has no weights (set eval.scorers.{name}.weights in the config) "
                             f"and is not a toy scorer ({', '.join(TOY_SCORERS)})")
    out.update(load_scorers(learned, device))
    return {n: out[n] for n in names}


def _diversity(images: np.ndarray, k: int) -> np.ndarray:
    """Within-prompt pairwise RMS pixel distance (engine/toy/metrics.py) of each prompt's k
    images, repeated on its rows (NaN for k = 1)."""
    from sail.engine.toy.metrics import within_prompt_diversity

    values = []
    for s in range(0, len(images), k):
        group = images[s:s + k]
        values += [within_prompt_diversity(group, ["p"] * len(group))["diversity/pairwise_rms"]] * len(group)
    return np.asarray(values, dtype=np.float64)


@torch.no_grad()
def render(comps, model_dir: str, prompts: list[str], seeds: list[int], sampling: SamplingConfig) -> np.ndarray:
    """uint8 images [B, H, W, 3], ``len(seeds) / len(prompts)`` per prompt in prompt-major order:
    sampled latents decoded by the VAE (or, without one, the samples themselves)."""
    from sail.engine.sail import sample_prompts
    from sail.engine.sampling import latents_to_uint8

    latents, _ = sample_prompts(comps, model_dir, prompts, seeds, sampling)
    if comps.vae is None:
        return latents_to_uint8(latents)
    out = []
    for i in range(0, len(latents), sampling.batch_size):
        z = latents[i:i + sampling.batch_size].to(comps.vae.device, torch.float32) / comps.latent_scale
        out.append(latents_to_uint8(comps.vae.decode(z).sample))
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# rank 0: merge, tabulate, draw
# --------------------------------------------------------------------------------------------

def evaluate_models(models: list[EvalModel], benches: list[PromptSet], cfg: EvalConfig, out: Path, ranks: Ranks,
                    scorers: list[str], *, baseline: EvalModel | None = None, toy_oracle: str | None = None,
                    progress: bool = True, loaded: dict | None = None) -> dict | None:
    """Evaluate every model (and the baseline) on every benchmark; rank 0 writes the outputs and
    returns the table (other ranks: None). ``loaded``: the scorers, if already loaded."""
    start = time.time()
    out = Path(out)
    everyone = models + ([baseline] if baseline else [])
    if len({m.label for m in everyone}) != len(everyone):
        raise InputError(f"--model/--baseline: two models share a label ({[m.label for m in everyone]}); "
                         "give folders with different names")
    harness = Harness(cfg, out, ranks, scorers, toy_oracle=toy_oracle, progress=progress, loaded=loaded)
    # A scorer that fails to load fails on the ranks that have chunks to score (it loads
    # lazily): agreed, so that the ranks without any end with them instead of waiting.
    ranks.agreed(lambda: [harness.run(model, bench) for model in everyone for bench in benches])
    if not ranks.is_main:
        return None
    frames = {(m.label, b.name): read_rows(out / m.label / b.name, len(b.prompts) * protocol(m, cfg)[1])
              for m in everyone for b in benches}
    write_scores(out / "scores.parquet", frames)
    table = tabulate(frames, [m.label for m in everyone], benches, scorers, baseline.label if baseline else None)
    table["seconds"] = round(time.time() - start, 1)
    table["images"] = int(sum(len(f["prompt"]) for f in frames.values()))
    write_json(out / "table.json", table)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table_markdown(table)))
    for bench in benches:
        draw_grid(out / f"grid_{bench.name}.png", out, [m.label for m in everyone], bench, frames)
    if len(everyone) > 1:
        plot_scores(out / "scores_vs_model.png", table)
    log.info("evaluated %d model(s) on %s in %.1f s", len(everyone), [b.name for b in benches], table["seconds"])
    return table


def read_rows(folder: Path, images: int | None = None) -> dict[str, list]:
    """All chunk rows of one (model, benchmark), in prompt order; with ``images``, checked to
    be every (prompt, image) exactly once (a foreign or stale chunk would skew the table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((folder / "chunks").glob("*.parquet"))
    if not files:
        raise RuntimeError(f"{folder}: no scored chunks")
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pydict()
    keys = list(zip(rows["prompt_idx"], rows["image_idx"]))
    if images is not None and (len(keys) != images or len(set(keys)) != images):
        raise InputError(f"{folder}/chunks: {len(keys)} scored images ({len(set(keys))} distinct), {images} "
                         "expected: chunks of another evaluation are there; delete the folder and evaluate again")
    return rows


def write_scores(path: Path, frames: dict) -> None:
    cols: dict[str, list] = {"model": [], "benchmark": []}
    keys = sorted({k for f in frames.values() for k in f})
    for k in keys:
        cols[k] = []
    for (label, bench), f in frames.items():
        n = len(f["prompt"])
        cols["model"] += [label] * n
        cols["benchmark"] += [bench] * n
        for k in keys:
            cols[k] += [f"{label}/{bench}/{v}" if k == "image" else v for v in f.get(k, [None] * n)]
    write_parquet(path, cols)


def per_prompt(frame: dict, scorer: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(prompt ids, the scorer's mean over each prompt's images, each prompt's category)."""
    ids = np.asarray(frame["prompt_idx"])
    values = np.asarray(frame[scorer], dtype=np.float64)
    uniq, inverse = np.unique(ids, return_inverse=True)
    means = np.bincount(inverse, weights=values) / np.bincount(inverse)
    cats = {p: c for p, c in zip(frame["prompt_idx"], frame["category"])}
    return uniq, means, [cats[p] for p in uniq]


def _cell(values: np.ndarray) -> dict:
    mean, lo, hi = bootstrap_interval(values)
    return {"mean": mean, "lo": lo, "hi": hi, "n": int(values.size)}


def tabulate(frames: dict, labels: list[str], benches: list[PromptSet], scorers: list[str],
             baseline: str | None) -> dict:
    """{"benchmarks": {bench: {scorer: {model: cell}}}, "categories": {bench: {scorer: {category:
    {model: cell}}}}, "win_rate": {bench: {scorer: {model: cell}}}}; a cell is mean, 95% bootstrap
    interval (lo, hi) over prompts and n prompts."""
    table: dict = {"models": labels, "baseline": baseline, "benchmarks": {}, "categories": {}, "win_rate": {}}
    for bench in benches:
        b = bench.name
        table["benchmarks"][b], table["categories"][b], table["win_rate"][b] = {}, {}, {}
        for s in scorers:
            table["benchmarks"][b][s] = {}
            by_cat: dict = {}
            for label in labels:
                ids, means, cats = per_prompt(frames[(label, b)], s)
                table["benchmarks"][b][s][label] = _cell(means)
                if bench.categories:
                    for cat in sorted(set(cats)):
                        mask = np.array([c == cat for c in cats])
                        by_cat.setdefault(cat, {})[label] = _cell(means[mask])
            table["categories"][b][s] = by_cat
            if baseline:
                _, base_means, _ = per_prompt(frames[(baseline, b)], s)
                table["win_rate"][b][s] = {}
                for label in (x for x in labels if x != baseline):
                    _, means, _ = per_prompt(frames[(label, b)], s)
                    mean, lo, hi = win_rate(means, base_means)
                    table["win_rate"][b][s][label] = {"mean": mean, "lo": lo, "hi": hi, "n": int(means.size),
                                                      "ties": float((win_indicator(means, base_means) == 0.5).mean())}
    return table


def _fmt(cell: dict | None) -> str:
    if not cell:
        return "–"
    digits = 2 if max(abs(cell["mean"]), abs(cell["hi"])) >= 10 else 4
    return f"{cell['mean']:.{digits}f} [{cell['lo']:.{digits}f}, {cell['hi']:.{digits}f}]"


def table_markdown(table: dict) -> str:
    """The layout of SAIL's Table 1: per benchmark a row per model, a column per scorer (mean and
    95% bootstrap interval over prompts); per category where the set has categories (the HPSv2
    benchmark's styles); win rates against the baseline."""
    lines = ["# Evaluation", "", "Mean over prompts [95% bootstrap interval].", ""]
    for bench, by_scorer in table["benchmarks"].items():
        scorers = list(by_scorer)
        n = next(iter(next(iter(by_scorer.values())).values()))["n"]
        lines += [f"## {bench} ({n} prompts)", "", "| model | " + " | ".join(scorers) + " |",
                  "|---" * (len(scorers) + 1) + "|"]
        for label in table["models"]:
            lines.append(f"| {label} | " + " | ".join(_fmt(by_scorer[s].get(label)) for s in scorers) + " |")
        lines.append("")
        for scorer, by_cat in table["categories"][bench].items():
            if not by_cat:
                continue
            cats = list(by_cat)
            lines += [f"### {bench}, {scorer} by category", "", "| model | " + " | ".join(cats) + " | all |",
                      "|---" * (len(cats) + 2) + "|"]
            for label in table["models"]:
                lines.append(f"| {label} | " + " | ".join(_fmt(by_cat[c].get(label)) for c in cats)
                             + f" | {_fmt(by_scorer[scorer].get(label))} |")
            lines.append("")
    if table["baseline"]:
        lines += [f"## Win rate against {table['baseline']}", "",
                  "Fraction of prompts on which the model scores higher (ties count half).", "",
                  "| benchmark | scorer | model | win rate |", "|---|---|---|---|"]
        for bench, by_scorer in table["win_rate"].items():
            for scorer, by_model in by_scorer.items():
                for label, cell in by_model.items():
                    lines.append(f"| {bench} | {scorer} | {label} | {_fmt(cell)} |")
        lines.append("")
    return "\n".join(lines)


def draw_grid(path: Path, out: Path, labels: list[str], bench: PromptSet, frames: dict, thumb: int = 160) -> None:
    """The first prompts of a benchmark, one row each, the first image of every model side by side."""
    from PIL import Image, ImageDraw

    rows = list(range(min(GRID_PROMPTS, len(bench.prompts))))
    label_w, top = 220, 18
    canvas = Image.new("RGB", (label_w + len(labels) * (thumb + 4), top + len(rows) * (thumb + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        draw.text((label_w + c * (thumb + 4) + 2, 3), label[:24], fill=(0, 0, 0))
        files = dict(zip(zip(frames[(label, bench.name)]["prompt_idx"], frames[(label, bench.name)]["image_idx"]),
                         frames[(label, bench.name)]["image"]))
        for r, p in enumerate(rows):
            with Image.open(out / label / bench.name / files[(p, 0)]) as im:
                tile = im.convert("RGB").resize((thumb, thumb), Image.NEAREST if im.width < 64 else Image.BICUBIC)
            canvas.paste(tile, (label_w + c * (thumb + 4) + 2, top + r * (thumb + 4) + 2))
    for r, p in enumerate(rows):
        draw.text((4, top + r * (thumb + 4) + thumb // 2 - 6), bench.prompts[p][:34], fill=(0, 0, 0))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def plot_scores(path: Path, table: dict) -> None:
    """Every (benchmark, scorer) mean with its interval against the models in order: over SAIL
    iterations when the models are a run's base, iter_000, iter_001, ... (the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(b, s, cells) for b, by_s in table["benchmarks"].items() for s, cells in by_s.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    labels = table["models"]
    x = np.arange(len(labels))
    for ax, (bench, scorer, cells) in zip(axes[0], panels):
        mean = np.array([cells[m]["mean"] for m in labels])
        err = np.array([[cells[m]["mean"] - cells[m]["lo"] for m in labels], [cells[m]["hi"] - cells[m]["mean"] for m in labels]])
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3)
        ax.set_title(f"{bench}: {scorer}", fontsize=9)
        ax.set_xticks(x, [m.replace("iter_", "") for m in labels], fontsize=7, rotation=30)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
