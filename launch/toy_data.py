"""Build (or check) the toy world's data folder: ``python launch/toy_data.py --out DIR``.

Splits, seed and full preference sets in the Pick-a-Pic v2 schema; everything lives in
engine/toy/data.py. A valid folder is left untouched.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from sail.launch.entry import config_options  # noqa: E402

DEFAULT_BASE = Path(__file__).resolve().parents[1] / "engine" / "toy" / "base_model"


@click.command(context_settings={"show_default": True})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Data folder to build or check.")
@click.option("--base-model", default=str(DEFAULT_BASE), type=click.Path(file_okay=False),
              help="Base model folder whose samples make the pairs.")
@config_options("ToyWorldConfig")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--progress/--no-progress", default=True, help="Progress bar while sampling.")
def main(out, base_model, config_path, overrides, threads, progress):
    """Build the toy data folder if absent, incomplete or stale, and print its summary."""
    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults(threads)
    from sail.engine.configtree import load_dataclass
    from sail.engine.toy.data import describe, ensure_toy_data
    from sail.engine.toy.world import ToyWorldConfig

    with user_input_errors():
        cfg = load_dataclass(ToyWorldConfig, config_path, overrides)
    paths = ensure_toy_data(out, cfg, base_model, progress=progress)
    click.echo(describe(paths))


if __name__ == "__main__":
    main()
