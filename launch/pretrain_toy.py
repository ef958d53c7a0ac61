"""Pretrain the toy world's base model: ``python launch/pretrain_toy.py --out DIR --set steps=N``.

A one-off (the trained folder ships in engine/toy/base_model/); everything lives in
engine/toy/pretrain.py.
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
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@config_options("PretrainConfig")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(out, config_path, overrides, threads, quiet):
    """Pretrain the toy base model on rendered images and write a diffusers-format folder.
    Settings are PretrainConfig's fields (engine/toy/pretrain.py), e.g. --set steps=4000
    --set spec.unet_channels=[16,32,64] --set init_from=base_v2."""
    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults(threads)
    from sail.engine.configtree import load_dataclass
    from sail.engine.toy.pretrain import PretrainConfig, pretrain

    with user_input_errors():
        cfg = load_dataclass(PretrainConfig, config_path, overrides)
    record = pretrain(cfg, out, progress=not quiet)
    last = record["losses"][-1] if record["losses"] else {}
    click.echo(json.dumps({"out": str(out), "steps": record.get("steps_done"), "duration_s": record.get("duration_s"),
                           "unet_parameters": record["unet_parameters"], "final_loss": last.get("loss")}))


if __name__ == "__main__":
    main()
