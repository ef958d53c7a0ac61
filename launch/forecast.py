"""Stage-time forecast of a run config on N GPUs:
``python launch/forecast.py --config sdxl_zero3.json --gpus 8 --gpus 64 [--arch sdxl]``.

Everything lives in engine/forecast.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# Run as a script without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402


@click.command(context_settings={"show_default": True})
@click.option("--config", "config_name", required=True, help="Run config: a path, or a name in ./ then configs/.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option("--gpus", multiple=True, type=int, default=(8,), help="GPU counts to forecast (repeatable).")
@click.option("--arch", type=click.Choice(["sd15", "sdxl", "tiny-sd15", "tiny-sdxl"]), default=None,
              help="Architecture when model.path is not on this machine.")
@click.option("--peak-tflops", type=float, default=989.4, help="Dense peak TFLOP/s of one GPU (H100 SXM bf16).")
@click.option("--mfu", type=float, default=0.40, help="Fraction of the peak the stages reach.")
def main(config_name, overrides, gpus, arch, peak_tflops, mfu):
    """Print how long each stage of each iteration will take (markdown; JSON last line)."""
    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults()
    from sail.engine.config import load_config
    from sail.engine.forecast import Model, forecast, markdown, run_pools, stage_work

    with user_input_errors():
        cfg = load_config(config_name, list(overrides))
        pools, seed_pairs = run_pools(cfg)
        model = Model.of(cfg, arch)
    out = []
    for n in gpus:
        rows = forecast(stage_work(cfg, model, n, pools, seed_pairs), n, peak_tflops * 1e12 * mfu)
        click.echo(markdown(rows, f"{cfg.name} on {n} GPUs ({peak_tflops:g} TFLOP/s peak x MFU {mfu:g})") + "\n")
        out += rows
    click.echo(json.dumps({"config": cfg.name, "peak_tflops": peak_tflops, "mfu": mfu, "rows": out}))


if __name__ == "__main__":
    main()
