"""The SAIL paper's data recipe from local Pick-a-Pic v2 shards (docs/method.md, Data).

From the kept rows of ``data.train`` (ties, unlabelled and malformed rows already dropped by
the reader):

- the seed set: ``seed_pairs`` rows drawn at random (paper: 50K of ~851K pairs);
- the iteration pools: disjoint prompt sets of ``pool_sizes`` (paper: 10K, 20K, 20K), taken in
  a random order from the de-duplicated captions of the remaining rows, never a seed prompt or
  an evaluation prompt;
- the evaluation prompts: ``eval.prompt_files`` when given (e.g. the ``validation_unique``
  split's captions), else ``eval_prompts`` captions of the remaining rows, held out.

The split is a function of the kept rows and the split seed. It is written once into the run
directory (``split.parquet``: role, caption, file, row; ``split.json``: counts, overlaps, and a
fingerprint of the data files and settings) and checked on resume: a changed file or setting
is refused instead of silently training on another split.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sail.engine.configtree import ConfigError, require

if TYPE_CHECKING:
    from sail.engine.data.pickapic import PairRef


@dataclass
class PickapicConfig:
    """The pickapic world's section: the paper's split of data.train (optional)."""

    seed_pairs: int | None = None
    """Seed-set size drawn at random from data.train's kept pairs; the remaining rows' prompts feed
    the pools (None: every kept pair is the seed set, the pools come from sail.prompt_files)."""
    pool_sizes: list[int] = field(default_factory=list)
    """Prompts per SAIL iteration pool, in order (paper: [10000, 20000, 20000])."""
    eval_prompts: int = 500
    """Held-out prompts taken from the remaining rows when eval.prompt_files is empty."""
    split_seed: int | None = None
    """Seed of the split (None: the run seed)."""

    def __post_init__(self):
        require(self.seed_pairs is None or self.seed_pairs >= 1, "seed_pairs", f"must be >= 1, got {self.seed_pairs}")
        require(all(n >= 1 for n in self.pool_sizes), "pool_sizes", f"must be >= 1 each, got {self.pool_sizes}")
        require(self.eval_prompts >= 0, "eval_prompts", f"must be >= 0, got {self.eval_prompts}")
        require(self.seed_pairs is not None or not self.pool_sizes, "pool_sizes",
                "only with seed_pairs (the recipe); without it the pools are sail.prompt_files")

    @property
    def recipe(self) -> bool:
        return self.seed_pairs is not None


@dataclass
class Split:
    """Indices of the seed rows (into the kept refs), the pools and the evaluation prompts."""

    seed_rows: list[int]
    pools: list[list[str]]
    eval_prompts: list[str]

    def report(self, refs: "list[PairRef]") -> dict:
        seed_prompts = {refs[i].caption for i in self.seed_rows}
        sets = {"seed": seed_prompts, "eval": set(self.eval_prompts),
                **{f"pool_{i + 1}": set(p) for i, p in enumerate(self.pools)}}
        names = list(sets)
        overlaps = {f"{a}&{b}": len(sets[a] & sets[b]) for i, a in enumerate(names) for b in names[i + 1:]}
        return {"kept_pairs": len(refs), "seed_pairs": len(self.seed_rows), "seed_prompts": len(seed_prompts),
                "pool_sizes": [len(p) for p in self.pools], "eval_prompts": len(self.eval_prompts),
                "overlaps": overlaps}


def make_split(refs: "list[PairRef]", settings: PickapicConfig, iterations: int, seed: int,
               eval_prompts: list[str] | None = None) -> Split:
    """The recipe's split of the kept rows ``refs`` (see the module docstring); ``eval_prompts``
    from the user's files, or None to hold out ``settings.eval_prompts`` captions."""
    sizes = settings.pool_sizes[:iterations]
    if len(sizes) < iterations:
        raise ConfigError(f"pickapic.pool_sizes: {iterations} SAIL iterations need {iterations} pool sizes, "
                          f"got {settings.pool_sizes}")
    # rows of the user's evaluation prompts are never trained on, not even as seed pairs
    held = set(eval_prompts or ())
    eligible = np.array([i for i, r in enumerate(refs) if r.caption not in held], dtype=np.int64)
    if settings.seed_pairs > len(eligible):
        raise ConfigError(f"pickapic.seed_pairs: {settings.seed_pairs} seed pairs asked, data.train keeps "
                          f"{len(eligible)} pairs outside the evaluation prompts")
    order = eligible[np.random.default_rng(seed).permutation(len(eligible))]
    seed_rows = sorted(int(i) for i in order[:settings.seed_pairs])
    taken = {refs[i].caption for i in seed_rows} | held
    rest = _unique(refs[int(i)].caption for i in order[settings.seed_pairs:] if refs[int(i)].caption not in taken)
    held_out = eval_prompts if eval_prompts is not None else rest[:settings.eval_prompts]
    rest = rest[0 if eval_prompts is not None else settings.eval_prompts:]
    if sum(sizes) > len(rest):
        raise ConfigError(f"pickapic.pool_sizes: {sum(sizes)} pool prompts asked ({sizes}), data.train has "
                          f"{len(rest)} distinct prompts outside the seed set and the evaluation prompts")
    pools, start = [], 0
    for n in sizes:
        pools.append(rest[start:start + n])
        start += n
    return Split(seed_rows, pools, list(held_out))


def _unique(items) -> list[str]:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def fingerprint(files: list[str], settings: PickapicConfig, iterations: int, seed: int,
                eval_prompts: list[str] | None) -> str:
    """What the split depends on: the data files (path, size, modification time), the settings,
    the iterations, the seed and the evaluation prompts given."""
    parts = [[f, os.path.getsize(f), int(os.path.getmtime(f))] for f in files]
    blob = json.dumps([parts, asdict(settings), iterations, seed, eval_prompts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_split(folder: Path, refs: "list[PairRef]", split: Split, stamp: str) -> dict:
    """``split.parquet`` (role, caption, file, row) and ``split.json`` (report, fingerprint)."""
    from sail.engine.io import write_json, write_parquet

    cols = {"role": [], "caption": [], "file": [], "row": []}
    for i in split.seed_rows:
        cols["role"].append("seed"), cols["caption"].append(refs[i].caption)
        cols["file"].append(refs[i].file), cols["row"].append(refs[i].row)
    for role, prompts in [(f"pool_{k + 1}", p) for k, p in enumerate(split.pools)] + [("eval", split.eval_prompts)]:
        for prompt in prompts:
            cols["role"].append(role), cols["caption"].append(prompt), cols["file"].append(""), cols["row"].append(-1)
    report = split.report(refs)
    write_parquet(folder / "split.parquet", cols)
    write_json(folder / "split.json", {"fingerprint": stamp, **report})
    return report


def read_split(folder: Path, stamp: str) -> tuple[list[tuple[str, int]], list[list[str]], list[str]] | None:
    """The written split (seed (file, row) pairs, pools, evaluation prompts), or None if there is
    none; a split written from other data or settings is refused."""
    import pyarrow.parquet as pq

    from sail.engine.io import read_json

    meta = folder / "split.json"
    if not meta.is_file():
        return None
    if read_json(meta)["fingerprint"] != stamp:
        raise ConfigError(f"{meta}: the data split of this run was made from other data.train files or "
                          f"pickapic settings; use a new run directory (or restore them)")
    t = pq.read_table(folder / "split.parquet").to_pydict()
    seed = [(f, r) for role, f, r in zip(t["role"], t["file"], t["row"]) if role == "seed"]
    n_pools = len({role for role in t["role"] if role.startswith("pool_")})
    pools = [[c for role, c in zip(t["role"], t["caption"]) if role == f"pool_{k + 1}"] for k in range(n_pools)]
    return seed, pools, [c for role, c in zip(t["role"], t["caption"]) if role == "eval"]
