"""Train entry point: ``python launch/train.py --config toy_cpu.json`` (one process) or
``deepspeed [--num_gpus N] launch/train.py --config sdxl_zero3.json`` (DeepSpeed).

Parses, validates, builds, runs, closes; everything else lives in engine/.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python launch/train.py`, `deepspeed launch/train.py`) without installing:
# the root's sail/ makes the checkout's folders importable as sail.* (see sail/__init__.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402


@click.command(context_settings={"show_default": True})
@click.option("--config", "config_name", required=True, help="Config file: a path, or a name looked up in ./ then configs/.")
@click.option("--run-dir", default=None, help="Run directory (default: runs/<name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value, e.g. train.lr=1e-5.")
@click.option("--stage", default=None, help="Run one stage alone (SAIL: generate, rank, pair, mix, train, evaluate).")
@click.option("--iteration", type=int, default=None, help="Iteration of --stage.")
@click.option("--local_rank", "--local-rank", type=int, default=None, hidden=True, help="Set by the deepspeed launcher.")
def main(config_name, run_dir, overrides, stage, iteration, local_rank):
    """Train with a config: method dpo (one Diffusion-DPO stage) or sail (the iterative loop)."""
    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults()
    from sail.engine.config import load_config
    from sail.engine.run import run

    overrides = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
    with user_input_errors():
        cfg = load_config(config_name, overrides)
        out = run(cfg, stage=stage, iteration=iteration)
    click.echo(f"done: {out}")


if __name__ == "__main__":
    main()
