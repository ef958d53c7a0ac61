"""Dispatch of a validated config to its method."""
from __future__ import annotations

from pathlib import Path

from engine.config import RunConfig
from engine.configtree import ConfigError
from engine.models import check_model_folder


def preflight(cfg: RunConfig) -> None:
    """Checks that need no model or data loaded: fail within seconds, before any work."""
    if cfg.model.path:
        check_model_folder(cfg.model.resolved_path())
    if not cfg.data.train and not cfg.toy.enabled:
        raise ConfigError("data.train: no preference data (give Pick-a-Pic parquet files, or enable toy)")


def run(cfg: RunConfig, stage: str | None = None, iteration: int | None = None) -> Path:
    preflight(cfg)
    if cfg.method == "sspo":
        raise ConfigError("method: 'sspo' is not available yet (it will reuse these stages)")
    from engine.controller import run_controller

    return run_controller(cfg, stage=stage, iteration=iteration)
