"""The results table: ``python launch/ablations.py --config toy_cpu.json --seeds 0,1,2 --out runs/table``.

Runs (or resumes) every arm of engine/ablations.py for every training seed, then writes
table.md, table.json and table.png under --out: mean ± s.e. across seeds. ``--table-only``
rewrites the table from the runs already there; two processes with different --seeds can share
one --out (one table at the end: run --table-only once both are done).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402


@click.command(context_settings={"show_default": True})
@click.option("--config", "config_name", default="toy_cpu.json", help="A method 'sail' config (path or name in configs/).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder of the runs and the table.")
@click.option("--seeds", default="0,1,2", help="Training seeds, comma-separated.")
@click.option("--arms", default="sail,dpo_full,no_mixup,random_pairing,online_dpo", help="Arms to run, comma-separated.")
@click.option("--variant", "variants", multiple=True, metavar="NAME:KEY=VALUE[;KEY=VALUE]",
              help='An extra arm forked from iteration 0, e.g. \'fixed_ref:sail.train_reference="base"\'.')
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value of the base config.")
@click.option("--table-only", is_flag=True, help="Only aggregate the runs already in --out.")
def main(config_name, out, seeds, arms, variants, overrides, table_only):
    """Run SAIL, its baselines and its ablations over several seeds, and tabulate them."""
    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults()
    from sail.engine.ablations import parse_variant, read_base_config, run_arms, write_table
    from sail.engine.run import run

    out = Path(out)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of integers: {seeds!r}", param_hint="--seeds") from None
    with user_input_errors():
        if not table_only:
            base, where = read_base_config(config_name, list(overrides))
            extra = tuple(parse_variant(v) for v in variants)
            run_arms(base, where, seed_list, [a.strip() for a in arms.split(",") if a.strip()], out, run, extra)
        path = write_table(out)
    click.echo(path.read_text())


if __name__ == "__main__":
    main()
