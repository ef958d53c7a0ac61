"""How well the self-ranking agrees with the toy world's oracle, against its cost:
``python launch/rank_study.py --run runs/toy_sail --out runs/rank_study [--set max_draws=64]``.

Everything lives in engine/toy/rank_study.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# Run as a script without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from sail.launch.entry import config_options  # noqa: E402


@click.command(context_settings={"show_default": True})
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="A finished toy-world SAIL run directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where rank_study.json / .png go.")
@config_options("RankStudyConfig")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
def main(run_dir, out, config_path, overrides, threads):
    """Rank one iteration's candidates with many draws; agreement, Kendall tau and the pair
    against K and adaptive K."""
    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults(threads)
    from sail.engine.configtree import load_dataclass
    from sail.engine.toy.rank_study import RankStudyConfig, rank_study

    with user_input_errors():          # the config, and what the run cannot give (no oracle, a degenerate reference)
        cfg = load_dataclass(RankStudyConfig, config_path, overrides)
        rows = rank_study(run_dir, out, cfg)
    for row in rows:
        click.echo(json.dumps(row))


if __name__ == "__main__":
    main()
