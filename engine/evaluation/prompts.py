"""The papers' prompt sets, read from the user's local files in their published formats.

- ``pickapic``: Pick-a-Pic v2 parquet (a file, a folder of shards or a glob), column
  ``caption``, de-duplicated in file order (``validation_unique``: 500 prompts);
- ``parti``: PartiPrompts TSV with the header ``Prompt  Category  Challenge  Note`` (1632 rows;
  categories from ``Category``);
- ``hpsv2``: the HPSv2 benchmark folder of four JSON lists (``anime.json``, ``concept-art.json``,
  ``paintings.json``, ``photo.json``, 800 prompts each; categories = the styles);
- ``toy``: the toy world's held-out prompts (the path, if any, is a toy data folder).

A file that cannot be read, a missing column and an empty prompt are each one ``DataError``
naming the file and the row: a benchmark with a hole in it is not the benchmark.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sail.engine.data.pickapic import DataError

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


@dataclass
class PromptSet:
    """One benchmark's prompts, with a category per prompt where the set has categories."""

    name: str
    prompts: list[str]
    categories: list[str] | None = None
    source: str = ""
    image_seed: Callable[[int, int, int], int] | None = None
    """(eval seed, prompt index, image index) -> seed, where the set has its own (the toy world's
    evaluation seeds); None: ``seeds.eval_image``."""

    def __post_init__(self):
        if not self.prompts:
            raise DataError(f"{self.name}: {self.source}: no prompts")
        if self.categories is not None and len(self.categories) != len(self.prompts):
            raise ValueError(f"{self.name}: {len(self.categories)} categories for {len(self.prompts)} prompts")

    def head(self, n: int | None) -> "PromptSet":
        """The first ``n`` prompts (all when None): the cheap subset an iteration evaluates on."""
        if n is None or n >= len(self.prompts):
            return self
        cats = self.categories[:n] if self.categories is not None else None
        return dataclasses.replace(self, prompts=self.prompts[:n], categories=cats)

    def seed(self, eval_seed: int, prompt: int, image: int) -> int:
        """The sampling seed of image ``image`` of prompt ``prompt``."""
        from sail.engine import seeds

        if self.image_seed is not None:
            return self.image_seed(eval_seed, prompt, image)
        return seeds.eval_image(eval_seed, self.name, prompt, image)


def _checked(prompt, where: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: empty or missing prompt ({prompt!r})")
    return prompt.strip()


def read_pickapic_prompts(path: str) -> PromptSet:
    """Unique captions of Pick-a-Pic v2 parquet shards (``validation_unique`` or any split)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import glob

    pattern = str(Path(path) / "*.parquet") if Path(path).is_dir() else path
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"pickapic: {path}: matches no parquet file")
    prompts: list[str] = []
    for file in files:
        try:
            schema = pq.read_schema(file)
            if "caption" not in schema.names:
                raise DataError(f"pickapic: {file}: no 'caption' column (found {schema.names[:8]})")
            captions = pq.read_table(file, columns=["caption"]).column("caption").to_pylist()
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"pickapic: {file}: cannot read parquet ({type(err).__name__}: {err})") from None
        prompts += [_checked(c, f"pickapic: {file}: row {i}") for i, c in enumerate(captions)]
    return PromptSet("pickapic", list(dict.fromkeys(prompts)), None, path)


def read_parti_prompts(path: str) -> PromptSet:
    """PartiPrompts TSV: ``Prompt`` and ``Category`` columns (``Challenge``, ``Note`` ignored)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"parti: {path}: cannot read TSV ({type(err).__name__}: {err})") from None
    for col in ("Prompt", "Category"):
        if col not in header:
            raise DataError(f"parti: {path}: no '{col}' column (header {list(header)}; expected Prompt, Category, "
                            "Challenge, Note, tab-separated)")
    prompts = [_checked(r["Prompt"], f"parti: {path}: row {i + 2}") for i, r in enumerate(rows)]
    return PromptSet("parti", prompts, [(r["Category"] or "").strip() or "-" for r in rows], path)


def read_hpsv2_prompts(folder: str) -> PromptSet:
    """The HPSv2 benchmark: ``<folder>/<style>.json`` for the four styles, each a JSON list."""
    prompts, styles = [], []
    for style in HPS_STYLES:
        file = Path(folder) / f"{style}.json"
        try:
            items = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"hpsv2: {file}: cannot read the style's JSON list ({type(err).__name__}: {err})") from None
        if not isinstance(items, list):
            raise DataError(f"hpsv2: {file}: expected a JSON list of prompts, got {type(items).__name__}")
        prompts += [_checked(p, f"hpsv2: {file}: item {i}") for i, p in enumerate(items)]
        styles += [style] * len(items)
    return PromptSet("hpsv2", prompts, styles, folder)


def read_toy_prompts(data_dir: str | None) -> PromptSet:
    """The toy world's held-out prompts (from ``data_dir``'s splits.json, else the default world),
    with the toy world's evaluation seeds: ``sail evaluate`` reproduces a toy run's own numbers."""
    from sail.engine.toy.data import image_seed
    from sail.engine.toy.evaluate import EVAL_STREAM, eval_prompts
    from sail.engine.toy.world import ToyWorldConfig

    return PromptSet("toy", eval_prompts(ToyWorldConfig(), data_dir), None, data_dir or "toy world (defaults)",
                     lambda seed, prompt, image: image_seed(seed, EVAL_STREAM, prompt, image))


READERS = {"pickapic": read_pickapic_prompts, "parti": read_parti_prompts, "hpsv2": read_hpsv2_prompts,
           "toy": read_toy_prompts}


def read_benchmark(name: str, path: str | None) -> PromptSet:
    """The prompt set ``name`` from ``path`` (the toy set needs none)."""
    if name not in READERS:
        raise DataError(f"benchmarks: unknown {name!r}; known: {', '.join(READERS)}")
    if path is None and name != "toy":
        raise DataError(f"benchmarks: {name}: no path (set eval.benchmarks.{name} to the local file or folder)")
    return READERS[name](path)
