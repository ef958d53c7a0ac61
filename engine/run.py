"""Dispatch of a validated config to its method."""
from __future__ import annotations

from pathlib import Path

from engine.config import RunConfig
from engine.configtree import ConfigError
from engine.models import check_model_folder


def preflight(cfg: RunConfig) -> None:
    """Checks that need no model or data loaded: fail within seconds, before any work."""
    if cfg.model.path:
        check_model_folder(cfg.model.path)


def run(cfg: RunConfig, stage: str | None = None, iteration: int | None = None) -> Path:
    preflight(cfg)
    if cfg.method == "dpo":
        if stage is not None:
            raise ConfigError("--stage applies to the iterative methods (sail, online_dpo), not dpo")
        from engine.jobs import run_dpo_job

        return run_dpo_job(cfg)
    raise ConfigError(f"method: {cfg.method!r} is not available yet")
