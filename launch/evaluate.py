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


@click.command(context_settings={"show_default": True})
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Diffusers-format model folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where metrics.json and samples.png go.")
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="Toy data folder whose splits.json gives the eval prompts (default: splits from the config).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="JSON file of ToyWorldConfig fields.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a ToyWorldConfig field.")
@click.option("--seeds-per-prompt", type=int, default=None, help="Images per prompt (default: the config's).")
@click.option("--max-prompts", type=int, default=None, help="Evaluate only the first N eval prompts.")
@click.option("--steps", type=int, default=None, help="DDIM steps (default: the config's).")
@click.option("--guidance", type=float, default=None, help="CFG scale (default: the config's).")
@click.option("--scorer", "scorer_names", multiple=True, default=("oracle",), help="Scorer name or module:function.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--progress/--no-progress", default=True, help="Progress bar while sampling.")
def main(model_dir, out, data_dir, config_path, overrides, seeds_per_prompt, max_prompts, steps, guidance,
         scorer_names, threads, progress):
    """Sample the model on the held-out prompts with fixed seeds and write its metrics."""
    import dataclasses

    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults(threads)
    from sail.engine.toy.evaluate import EvalSettings, eval_prompts, evaluate_model
    from sail.engine.toy.scorers import world_scorer
    from sail.engine.toy.world import load_world_config

    with user_input_errors(ValueError):   # ValueError: a scorer spec that does not load
        cfg = load_world_config(config_path, overrides)
        settings = EvalSettings.from_world(cfg)
        changes = {k: v for k, v in (("seeds_per_prompt", seeds_per_prompt), ("num_steps", steps),
                                      ("guidance_scale", guidance)) if v is not None}
        settings = dataclasses.replace(settings, **changes)
        scorers = {name.split(":")[-1]: world_scorer(name, cfg.oracle) for name in scorer_names}
    prompts = eval_prompts(cfg, data_dir)[:max_prompts]
    metrics = evaluate_model(model_dir, out, prompts, settings, scorers, progress=progress)
    click.echo(json.dumps({k: v for k, v in metrics.items() if k != "settings"}))


if __name__ == "__main__":
    main()
