"""The run directory: the one place that knows where every stage's files live.

    <run>/config.json, manifest.json      the resolved config; which stages are complete
    <run>/report.md, metrics.json, metrics.png, tb/, forecast.json (stage times forecast at start)
    <run>/base_model/                     model.arch built once with random weights (else model.path)
    <run>/cache/seed/                     the pre-encoded seed pairs (unless data.cache_dir is set)
    <run>/base_eval/                      evaluation of the base model
    <run>/iter_000/model/, metrics.json   iteration 0: DPO on the seed pairs
    <run>/iter_00i/candidates/            iteration i: generated latents by prompt chunk (+ index, seeds)
    <run>/iter_00i/rewards_chunks/        self-ranking rewards by prompt chunk (merged below)
    <run>/iter_00i/rewards.parquet        self-ranking (or external) rewards
    <run>/iter_00i/pairs.parquet, pairs_cache/, diagnostics.json
    <run>/iter_00i/train_set.parquet      the mix of generated and seed pairs
    <run>/iter_00i/model/, metrics.json, eval/
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory; iteration ``-1`` is the base model."""

    root: Path
    seed_cache_dir: Path | None = None
    """data.cache_dir when set (a cache shared between runs), else <root>/cache/seed."""

    @classmethod
    def of(cls, cfg) -> "RunLayout":
        """The layout of a RunConfig's run directory."""
        return cls(cfg.resolved_run_dir, Path(cfg.data.cache_dir) if cfg.data.cache_dir else None)

    # ---- the run as a whole ----
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def forecast(self) -> Path:
        return self.root / "forecast.json"

    @property
    def base_model(self) -> Path:
        return self.root / "base_model"

    @property
    def seed_cache(self) -> Path:
        return self.seed_cache_dir or self.root / "cache" / "seed"

    # ---- per iteration ----
    def iteration(self, i: int) -> Path:
        return self.root / f"iter_{i:03d}"

    def iterations(self) -> list[Path]:
        """The iteration folders present, in order."""
        return sorted(self.root.glob("iter_[0-9][0-9][0-9]"))

    def model(self, i: int) -> Path:
        return self.iteration(i) / "model"

    def candidates(self, i: int) -> Path:
        return self.iteration(i) / "candidates"

    def rewards(self, i: int) -> Path:
        return self.iteration(i) / "rewards.parquet"

    def rewards_chunks(self, i: int) -> Path:
        return self.iteration(i) / "rewards_chunks"

    def pairs(self, i: int) -> Path:
        return self.iteration(i) / "pairs.parquet"

    def pairs_cache(self, i: int) -> Path:
        return self.iteration(i) / "pairs_cache"

    def diagnostics(self, i: int) -> Path:
        return self.iteration(i) / "diagnostics.json"

    def train_set(self, i: int) -> Path:
        return self.iteration(i) / "train_set.parquet"

    def checkpoints(self, i: int) -> Path:
        """The training stage's step checkpoints (removed once its model is saved)."""
        return self.iteration(i) / "checkpoints"

    def train_metrics(self, i: int) -> Path:
        return self.iteration(i) / "metrics.json"

    def eval_dir(self, i: int) -> Path:
        return self.root / "base_eval" if i < 0 else self.iteration(i) / "eval"

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory (what a fork links)."""
        return str(Path(path).relative_to(self.root))
