"""Evaluate models with the papers' scorers on the papers' prompt sets (or a toy model with the
toy world's ground truth):

    sail evaluate --model runs/sd15/iter_003/model --baseline /models/sd15 --config configs/eval_sd15.json \
        --benchmarks pickapic,parti,hpsv2 --scorers pickscore,hpsv2,aesthetic,clip --out runs/eval_sd15
    deepspeed --num_gpus 8 launch/evaluate.py ...        (data-parallel: each rank a share of the prompts)
    sail evaluate --model runs/main_check --out runs/main_check/eval_all     (a run: base and every iteration)

Writes table.md / table.json (SAIL's Table 1 layout, bootstrap intervals, win rates against the
baseline), scores.parquet, sample grids and, for several models, the scores against them;
everything lives in engine/evaluation/. A killed evaluation resumes where it stopped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# Run as a script without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402


def load_eval_config(path: str | None, overrides: tuple[str, ...]):
    """``EvalConfig`` from a JSON file (a run config's ``eval`` section, or the section alone) and
    ``--set`` overrides of its keys; also the toy oracle a run config names."""
    from sail.engine.config import EvalConfig, find_config
    from sail.engine.configtree import apply_overrides, build_dataclass, read_json

    data, oracle, where = {}, None, path or "<defaults>"
    if path:
        path = find_config(path)   # as given, or a name in configs/
        where = str(path)
        data = read_json(path)
        oracle = data.get("toy", {}).get("world", {}).get("oracle") if isinstance(data.get("toy"), dict) else None
        data = data.get("eval", data) if "eval" in data else data
    data = apply_overrides(dict(data), list(overrides), where)
    return build_dataclass(EvalConfig, data, where, "eval"), oracle


@click.command(context_settings={"show_default": True})
@click.option("--model", "model_paths", multiple=True, required=True,
              help="A diffusers model folder, or a run directory (its base and every iteration). Repeatable.")
@click.option("--baseline", default=None, help="Model folder the win rates are taken against.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--benchmarks", default=None,
              help="Comma-separated: pickapic, parti, hpsv2 (paths from eval.benchmarks), toy. "
                   "Default: every eval.benchmarks entry, or toy for a toy model.")
@click.option("--scorers", default=None,
              help="Comma-separated: pickscore, hpsv2, aesthetic, clip (weights from eval.scorers); toy: oracle, "
                   "fidelity, diversity. Default: every eval.scorers entry, or the toy scorers for a toy model.")
@click.option("--config", "config_path", default=None,
              help="JSON (path or name in configs/): a run config (its eval section is used) or an eval section alone.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override an eval key (JSON value), e.g. --set scorers.pickscore.weights='\"/models/pickscore\"'.")
@click.option("--max-prompts", type=int, default=None, help="Only the first N prompts of each benchmark.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--progress/--no-progress", default=True, help="Progress bars (main rank).")
@click.option("--local_rank", "--local-rank", type=int, default=None, hidden=True, help="Set by the deepspeed launcher.")
def main(model_paths, baseline, out, benchmarks, scorers, config_path, overrides, max_prompts, threads, progress,
         local_rank):
    """Generate with fixed seeds (the papers' protocol by default), score, tabulate."""
    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults(threads)
    from sail.engine.config import DistributedConfig
    from sail.engine.evaluation.harness import TOY_SCORERS, evaluate_models, load_named_scorers, models_of
    from sail.engine.evaluation.prompts import read_benchmark
    from sail.engine.ranks import init_ranks

    with user_input_errors():
        cfg, oracle = load_eval_config(config_path, overrides)
        models = [m for p in model_paths for m in models_of(p)]
        base = models_of(baseline)[0] if baseline else None
        toy = all(m.pixel_space for m in models)
        names = benchmarks.split(",") if benchmarks else (list(cfg.benchmarks) or (["toy"] if toy else []))
        if not names:
            raise click.UsageError("no benchmark: give --benchmarks, or paths in eval.benchmarks of the config")
        benches = [read_benchmark(n, cfg.benchmarks.get(n)).head(max_prompts) for n in names]
        scorer_names = scorers.split(",") if scorers else (list(TOY_SCORERS) if toy else list(cfg.scorers))
        if not scorer_names:
            raise click.UsageError("no scorer: give --scorers, and weights in eval.scorers of the config")
        ranks = init_ranks(DistributedConfig())
        loaded = load_named_scorers(scorer_names, cfg, ranks.device, oracle)   # a bad weight path fails here
    table = evaluate_models(models, benches, cfg, Path(out), ranks, scorer_names, baseline=base, toy_oracle=oracle,
                            progress=progress, loaded=loaded)
    if table is not None:
        click.echo(json.dumps({"out": str(out), "images": table["images"], "seconds": table["seconds"],
                               "models": table["models"]}))


if __name__ == "__main__":
    main()
