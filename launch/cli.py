"""The `sail` console script: subcommands that mirror the launch scripts.

    sail train --config toy_cpu.json          = python launch/train.py --config toy_cpu.json
    sail evaluate / sail toy-data / sail pretrain-toy / sail ablations / sail rank-study / sail forecast
"""
from __future__ import annotations

import importlib

import click

# subcommand -> module holding a click command named `main`; imported lazily so that
# `sail --help` stays fast and a missing optional dependency breaks only its own command.
COMMANDS = {
    "train": "sail.launch.train",
    "evaluate": "sail.launch.evaluate",
    "toy-data": "sail.launch.toy_data",
    "pretrain-toy": "sail.launch.pretrain_toy",
    "ablations": "sail.launch.ablations",
    "rank-study": "sail.launch.rank_study",
    "forecast": "sail.launch.forecast",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name]).main


@click.group(cls=LazyGroup)
def main():
    """sail: Diffusion-DPO and SAIL for text-to-image diffusion models."""


if __name__ == "__main__":
    main()
