"""Evaluate a pixel-space (toy) model folder on held-out prompts:
``python launch/evaluate.py --model DIR --out DIR``.

Writes metrics.json and samples.png; everything lives in engine/toy/evaluate.py.
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
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Diffusers-format model folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where metrics.json and samples.png go.")
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="Toy data folder whose splits.json gives the eval prompts (default: splits from the config).")
@config_options("ToyWorldConfig")
@click.option("--max-prompts", type=int, default=None, help="Evaluate only the first N eval prompts.")
@click.option("--scorer", "scorer_names", multiple=True, default=("oracle",), help="Scorer name or module:function.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--progress/--no-progress", default=True, help="Progress bar while sampling.")
def main(model_dir, out, data_dir, config_path, overrides, max_prompts, scorer_names, threads, progress):
    """Sample the model on the held-out prompts with fixed seeds and write its metrics. The
    protocol is the world's: --set eval_seeds_per_prompt=4 --set sampling.steps=10 ..."""
    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults(threads)
    from sail.engine.configtree import load_dataclass
    from sail.engine.toy.evaluate import EvalSettings, eval_prompts, evaluate_model
    from sail.engine.toy.scorers import world_scorer
    from sail.engine.toy.world import ToyWorldConfig

    with user_input_errors(ValueError):   # ValueError: a scorer spec that does not load
        cfg = load_dataclass(ToyWorldConfig, config_path, overrides)
        scorers = {name.split(":")[-1]: world_scorer(name, cfg.oracle) for name in scorer_names}
    prompts = eval_prompts(cfg, data_dir)[:max_prompts]
    metrics = evaluate_model(model_dir, out, prompts, EvalSettings.from_world(cfg), scorers, progress=progress)
    click.echo(json.dumps({k: v for k, v in metrics.items() if k != "settings"}))


if __name__ == "__main__":
    main()
