"""The world a run works in: where its preference data, prompt pools and evaluation prompts
come from, and what ground truth (if any) scores its samples.

Two worlds, one interface: ``pickapic`` (the user's files: Pick-a-Pic v2 parquet pairs,
prompt files, no ground truth) and ``toy`` (the embedded toy world, ``engine/toy/plugin.py``:
data built from its base model, prompt splits, an oracle that labels, ranks, diagnoses and
evaluates). The controller, the run checks and the report know only this interface.

A world may own a section of the run config, named after it (``"toy": {...}``): its
dataclass (``settings_class``) is built and validated at load like any other section, and
reaches the world as ``cfg.world_settings``; the core config never imports it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from sail.engine.configtree import ConfigError
from sail.engine.data.split import PickapicConfig

if TYPE_CHECKING:
    from sail.engine.config import RunConfig
    from sail.engine.ranks import Ranks
    from sail.engine.scorers import Scorer

# name -> "module:class"; a world's config section, if it has one, carries its name
WORLDS: dict[str, str] = {
    "pickapic": "sail.engine.worlds:PickapicWorld",
    "toy": "sail.engine.toy.plugin:ToyWorld",
}


@dataclass
class WorldData:
    """What a run trains and evaluates on, fixed before any stage runs."""

    train: list[str]
    """Preference data files (Pick-a-Pic v2 parquet schema)."""
    pools: list[list[str]]
    """One prompt pool per SAIL iteration."""
    eval_prompts: list[str]
    """Held-out prompts, disjoint from the pools."""
    select: str | None = None
    """The rows of ``train`` that form the seed set (data.select), None for all of them."""


class World:
    """The interface; ``cfg`` is the run config, ``self.settings`` the world's own section."""

    name: ClassVar[str]
    settings_class: ClassVar[type | None] = None
    """Dataclass of the config section named after the world (None: the world has none)."""
    evaluates: ClassVar[bool] = False
    """Whether ``evaluate`` can score a model (a world without scorers skips evaluate stages)."""

    def __init__(self, cfg: "RunConfig"):
        self.cfg = cfg
        self.settings = cfg.world_settings
        if self.settings is None and self.settings_class is not None:
            self.settings = self.settings_class()

    def preflight(self) -> None:
        """Checks of the user's input that need no model: fail in seconds, before any writing."""

    def prepare(self, ranks: "Ranks", base_model: str) -> WorldData:
        """Build or read the data (every rank calls it; rank 0 builds what must be built)."""
        raise NotImplementedError

    def evaluate(self, model_dir: str, prompts: list[str], out: Path, ranks: "Ranks") -> dict | None:
        """Score ``model_dir`` on ``prompts``, data-parallel over ``ranks`` (every rank calls it);
        rank 0 writes ``out/metrics.json`` and a sample grid and returns the metrics, the other
        ranks return None."""
        raise NotImplementedError(f"world {self.name!r} has no scorers to evaluate with")

    def diagnose(self, cands, rewards: dict, pairs: dict, out: Path) -> dict:
        """Ground-truth diagnostics of a pair stage (``rewards``: the rank stage's table), written
        to ``out``; returns extra pair columns."""
        return {}

    def scorer(self, name: str) -> "Scorer":
        """The external scorer ``name`` that ranks candidates in ``method: online_dpo``."""
        from sail.engine.scorers import get_scorer

        return get_scorer(name)


def world_class(name: str, where: str = "config") -> type[World]:
    if name not in WORLDS:
        raise ConfigError(f"{where}: world: unknown {name!r}; worlds: {', '.join(WORLDS)}")
    module, cls = WORLDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_world(cfg: "RunConfig") -> World:
    """The run's world."""
    return world_class(cfg.world)(cfg)


def check_disjoint(splits: dict[str, list[str]]) -> None:
    """Raise ValueError naming the two splits and an example prompt if any two overlap
    (or a split repeats a prompt)."""
    names = list(splits)
    for i, a in enumerate(names):
        if len(set(splits[a])) != len(splits[a]):
            dup = next(p for p in splits[a] if splits[a].count(p) > 1)
            raise ValueError(f"split {a!r} lists prompt {dup!r} more than once")
        for b in names[i + 1:]:
            shared = set(splits[a]) & set(splits[b])
            if shared:
                raise ValueError(f"splits {a!r} and {b!r} share {len(shared)} prompt(s), e.g. {sorted(shared)[0]!r}; "
                                 "never train on the prompts you evaluate on")


def check_prompt_sets(pools: list[list[str]], eval_prompts: list[str], where: str) -> None:
    """The pools and evaluation prompts of a run are pairwise disjoint (ConfigError naming ``where``)."""
    named = {f"pool_{i + 1}": p for i, p in enumerate(pools)}
    if eval_prompts:
        named["eval"] = eval_prompts
    try:
        check_disjoint(named)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


class PickapicWorld(World):
    """The user's files: Pick-a-Pic v2 parquet pairs (``data.train``), and either one prompt file
    per SAIL iteration (``sail.prompt_files``) or the paper's split of data.train (the
    ``pickapic`` section, ``engine/data/split.py``); held-out prompts from ``eval.prompt_files``
    (or the split). No ground truth: no pair diagnostics; evaluation with the learned scorers
    of ``eval.scorers`` when configured (else the evaluate stages are skipped)."""

    name = "pickapic"
    settings_class = PickapicConfig

    def __init__(self, cfg: "RunConfig"):
        super().__init__(cfg)
        # evaluates with the learned scorers of eval.scorers (engine/evaluation/), when configured
        self.evaluates = cfg.eval.enabled and bool(cfg.eval.scorers)
        self._benchmarks: list | None = None

    def preflight(self) -> None:
        from sail.engine.data.pickapic import expand_paths

        if not self.cfg.data.train:
            raise ConfigError('data.train: no preference data (give Pick-a-Pic parquet files, or set world: "toy")')
        expand_paths(self.cfg.data.train)
        if self.evaluates:
            from sail.engine.evaluation.scorers import check_scorer_paths

            self._eval_benchmarks()
            check_scorer_paths(self.cfg.eval.scorers)
        if not self.settings.recipe:
            self._prompt_sets()
            return
        if self.cfg.sail.prompt_files:
            raise ConfigError("sail.prompt_files: the pickapic recipe (pickapic.seed_pairs) makes the pools from "
                              "data.train; give prompt files or the recipe, not both")
        if self.cfg.data.select:
            raise ConfigError("data.select: the pickapic recipe (pickapic.seed_pairs) selects the seed rows itself")
        self._eval_from_files()

    def prepare(self, ranks: "Ranks", base_model: str) -> WorldData:
        data = self._prepare(ranks)
        if self.evaluates and ranks.is_main:
            self._warn_benchmark_overlap(data.pools)
        return data

    def _warn_benchmark_overlap(self, pools: list[list[str]]) -> None:
        """A benchmark prompt that is also in a generation pool is trained on: said, with a count."""
        import logging

        pooled = {p for pool in pools for p in pool}
        for bench in self._eval_benchmarks():
            shared = [p for p in bench.prompts if p in pooled]
            if shared:
                logging.getLogger(__name__).warning(
                    "eval.benchmarks.%s: %d of its %d evaluated prompts are also in a SAIL prompt pool (e.g. %r): "
                    "their scores measure trained-on prompts", bench.name, len(shared), len(bench.prompts), shared[0])

    def _prepare(self, ranks: "Ranks") -> WorldData:
        if not self.settings.recipe:
            pools, eval_prompts = self._prompt_sets()
            return WorldData(list(self.cfg.data.train), pools, eval_prompts)
        from sail.engine.data.split import read_split
        from sail.engine.layout import RunLayout

        folder, stamp = RunLayout.of(self.cfg).root, self._stamp()
        # rank 0 makes the split; a refusal there (pool sizes too large...) ends every rank
        ranks.agreed(lambda: self._ensure_split(folder, stamp) if ranks.is_main else None)
        _, pools, eval_prompts = read_split(folder, stamp)
        check_prompt_sets(pools, eval_prompts, f"{folder / 'split.parquet'}")
        return WorldData(list(self.cfg.data.train), pools, eval_prompts, select=str(folder / "split.parquet"))

    def evaluate(self, model_dir: str, prompts: list[str], out: Path, ranks: "Ranks") -> dict | None:
        """The learned scorers (``eval.scorers``) on the run's held-out prompts and on
        ``eval.benchmarks``, the first ``eval.max_prompts`` of each (engine/evaluation/harness.py:
        ``out/table.md``, ``scores.parquet``, grids); returns and writes ``out/metrics.json`` with
        ``<benchmark>/<scorer>/mean`` (and ``lo``, ``hi``: the bootstrap 95% interval)."""
        from sail.engine.evaluation.harness import EvalModel, evaluate_models
        from sail.engine.evaluation.prompts import PromptSet
        from sail.engine.io import write_json

        ev = self.cfg.eval
        benches = self._eval_benchmarks()
        if prompts:
            benches.insert(0, PromptSet("heldout", list(prompts), None, "the run's held-out prompts").head(ev.max_prompts))
        table = evaluate_models([EvalModel("model", model_dir)], benches, ev, out, ranks, list(ev.scorers),
                                progress=False)
        if table is None:           # not rank 0: its chunks are written, rank 0 tabulates
            return None
        metrics = {f"{b}/{s}/{k}": cells["model"][k] for b, by_s in table["benchmarks"].items()
                   for s, cells in by_s.items() for k in ("mean", "lo", "hi")}
        write_json(Path(out) / "metrics.json", {**metrics, "n_images": table["images"], "duration(s)": table["seconds"]})
        return metrics

    def _eval_benchmarks(self) -> list:
        """``eval.benchmarks``, the first ``eval.max_prompts`` of each (read once per world)."""
        from sail.engine.evaluation.prompts import read_benchmark

        if self._benchmarks is None:
            ev = self.cfg.eval
            self._benchmarks = [read_benchmark(name, path).head(ev.max_prompts) for name, path in ev.benchmarks.items()]
        return list(self._benchmarks)

    def _iterations(self) -> int:
        return self.cfg.sail.iterations if self.cfg.method in ("sail", "online_dpo") else 0

    def _eval_from_files(self) -> list[str] | None:
        from sail.engine.sail import read_prompt_file

        files = self.cfg.eval.prompt_files
        return [p for f in files for p in read_prompt_file(f, "eval.prompt_files")] if files else None

    def _stamp(self) -> str:
        from sail.engine.data.pickapic import expand_paths
        from sail.engine.data.split import fingerprint

        return fingerprint(expand_paths(self.cfg.data.train), self.settings, self._iterations(), self._split_seed(),
                           self._eval_from_files())

    def _split_seed(self) -> int:
        return self.cfg.seed if self.settings.split_seed is None else self.settings.split_seed

    def _ensure_split(self, folder: Path, stamp: str) -> None:
        """Make and write the split once (main rank); a resumed run checks it (``read_split``)."""
        import logging

        from sail.engine.data.pickapic import scan_pickapic
        from sail.engine.data.split import make_split, read_split, write_split

        if read_split(folder, stamp) is not None:
            return
        d = self.cfg.data
        refs, load = scan_pickapic(d.train, None, max_bad_fraction=d.max_bad_fraction, strict=d.strict)
        split = make_split(refs, self.settings, self._iterations(), self._split_seed(), self._eval_from_files())
        report = write_split(folder, refs, split, stamp)
        logging.getLogger(__name__).info("pickapic split (%s): %s", load.summary(), report)

    def _prompt_sets(self) -> tuple[list[list[str]], list[str]]:
        """The prompt pools (one file per SAIL iteration) and evaluation prompts, checked:
        enough pools, every file readable and non-empty, no prompt in two sets."""
        from sail.engine.sail import read_prompt_file

        cfg = self.cfg
        iterative = cfg.method in ("sail", "online_dpo")
        if iterative and len(cfg.sail.prompt_files) < cfg.sail.iterations:
            raise ConfigError(f"sail.prompt_files: {cfg.sail.iterations} iterations need {cfg.sail.iterations} "
                              f"prompt files, got {len(cfg.sail.prompt_files)}")
        files = cfg.sail.prompt_files[:cfg.sail.iterations] if iterative else []
        pools = [read_prompt_file(f, "sail.prompt_files") for f in files]
        eval_prompts = [p for f in cfg.eval.prompt_files for p in read_prompt_file(f, "eval.prompt_files")]
        check_prompt_sets(pools, eval_prompts, "sail.prompt_files / eval.prompt_files")
        return pools, eval_prompts
