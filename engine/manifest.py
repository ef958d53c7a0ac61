"""The run manifest: which stage of which iteration is complete, with its outputs and timing.

A stage is recorded only after all of its outputs were written (atomically), so a killed run
resumes at the first stage that is not recorded.
"""
from __future__ import annotations

import time
from pathlib import Path

from sail.engine.io import read_json, write_json


class Manifest:
    """``runs/<name>/manifest.json``: {"stages": {"iter_000/train": {...}, ...}, "started": {...}}:
    finished stages (outputs, seconds, the settings they depended on) and the settings each
    stage began with."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "manifest.json"
        self.data = read_json(self.path) if self.path.is_file() else {"stages": {}}

    @staticmethod
    def key(iteration: int, stage: str) -> str:
        return f"iter_{iteration:03d}/{stage}"

    def done(self, iteration: int, stage: str) -> bool:
        return self.key(iteration, stage) in self.data["stages"]

    def record(self, iteration: int, stage: str, outputs: list[str], seconds: float, **info) -> None:
        self.data["stages"][self.key(iteration, stage)] = {
            "outputs": outputs, "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        write_json(self.path, self.data)

    def start(self, iteration: int, stage: str, settings: dict) -> None:
        """Note that a stage began with ``settings``: a resume of its half-done outputs must match."""
        self.data.setdefault("started", {})[self.key(iteration, stage)] = {"settings": settings}
        write_json(self.path, self.data)

    def started(self, iteration: int, stage: str) -> dict | None:
        """The start note of a stage that began (and may not have finished)."""
        return self.data.get("started", {}).get(self.key(iteration, stage))

    def forget(self, stages: list[tuple[int, str]]) -> None:
        """Drop the records of ``stages`` [(iteration, stage)] (they will run again)."""
        for i, name in stages:
            self.data["stages"].pop(self.key(i, name), None)
            self.data.get("started", {}).pop(self.key(i, name), None)
        write_json(self.path, self.data)

    def get(self, iteration: int, stage: str) -> dict | None:
        return self.data["stages"].get(self.key(iteration, stage))
