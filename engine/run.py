"""Dispatch of a validated config to its method."""
from __future__ import annotations

import os
from pathlib import Path

from sail.engine.config import RunConfig
from sail.engine.models import check_model_folder


def preflight(cfg: RunConfig) -> None:
    """Checks of the user's input that need no model or data loaded: a bad path, a glob that
    matches nothing or an unreadable prompt file fails within seconds, before any work is spent
    and before the run directory is written."""
    from sail.engine.optim import deepspeed_config
    from sail.engine.worlds import make_world

    if cfg.model.path:
        check_model_folder(cfg.model.resolved_path())
    # The DeepSpeed config's checks (batch arithmetic against the launcher's world size, an
    # optimizer that cannot be offloaded) are functions of the config alone.
    deepspeed_config(cfg.train, cfg.distributed, int(os.environ.get("WORLD_SIZE", "1")), "fp32", on_cpu=True)
    make_world(cfg).preflight()


def run(cfg: RunConfig, stage: str | None = None, iteration: int | None = None) -> Path:
    preflight(cfg)
    from sail.engine.controller import run_controller

    return run_controller(cfg, stage=stage, iteration=iteration)
