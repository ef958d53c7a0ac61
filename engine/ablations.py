"""The results table: SAIL against its baselines and ablations, over several training seeds.

Arms (each a run directory per seed, all from one base config):

    sail            the config as given: base, iteration 0 (DPO on the seed set), SAIL 1..n
    dpo_full        method dpo on the 16x "full" preference set (the all-labels baseline)
    no_mixup        SAIL with alpha = 1 (only generated pairs after iteration 0)
    random_pairing  SAIL pairing two random candidates instead of best and worst
    online_dpo      the same loop ranked by the external scorer (the oracle on the toy world)
    dpo_seed_budget method dpo on the seed set for SAIL's total optimizer steps (iteration 0's
                    plus every iteration's): the seed-only continuation at equal steps
    sspo            method sspo (engine/sspo.py) on the seed set's winners, SAIL's total steps
    self_distillation  SAIL with random pairs in random order: no ranking signal at all
    seed_only       SAIL with alpha = 0: the iterations train on the seed pairs only
    winners_only    SAIL whose iterations train the winner term of sail.loss alone (loss sft)
    dpo_full_budget dpo_full for SAIL's total steps with the iterations' objective (sail.loss)
    dpo_seed_objective  iteration 0 trained with the iterations' objective (sail.loss)

no_mixup, random_pairing, online_dpo, self_distillation, seed_only and winners_only differ from
``sail`` only after iteration 0, so they fork its run directory
there (hard links of base_eval/, iter_000/, the seed cache and their manifest entries) instead
of training the same iteration-0 model again; the fork checks that everything iteration 0
depends on is equal. Every arm is an ordinary resumable run: a killed table resumes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sail.engine.config import RunConfig, config_from_dict, config_to_dict
from sail.engine.configtree import ConfigError, apply_overrides, to_dict
from sail.engine.controller import STAGE_TABLE, run_settings, stage_settings
from sail.engine.io import atomic_write, link_tree, write_json
from sail.engine.layout import RunLayout
from sail.engine.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]
    fork: bool            # fork the sail arm's iteration 0
    budget: bool = False  # train.steps = the sail arm's total optimizer steps (one stage)
    iteration_loss: bool = False  # train.loss = the iterations' objective (sail.loss)
    winners_only: bool = False  # the iterations train the winner term of sail.loss alone (loss sft)


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("sail", (), False),
    Arm("dpo_full", ('method="dpo"', 'toy.preference_set="full"'), False),
    Arm("no_mixup", ("sail.alpha=1.0",), True),
    Arm("random_pairing", ('sail.pairing="random"',), True),
    Arm("online_dpo", ('method="online_dpo"',), True),
    Arm("dpo_seed_budget", ('method="dpo"',), False, budget=True),
    Arm("sspo", ('method="sspo"',), False, budget=True),
    Arm("dpo_full_budget", ('method="dpo"', 'toy.preference_set="full"'), False, budget=True, iteration_loss=True),
    Arm("dpo_seed_objective", ('method="dpo"',), False, iteration_loss=True),
    Arm("self_distillation", ('sail.pairing="random_unranked"',), True),
    Arm("seed_only", ("sail.alpha=0.0",), True),
    Arm("winners_only", (), True, winners_only=True),
)}

# table rows: (label, arm, iteration directory); rows no seed has reached are left out of the table
ROWS = (
    ("base", "sail", "base"),
    ("DPO, seed set (iteration 0)", "sail", "iter_000"),
    ("iteration 0 with the iterations' objective (seed set)", "dpo_seed_objective", "iter_000"),
    ("DPO, full set (16x labels)", "dpo_full", "iter_000"),
    ("DPO, full set (16x labels), SAIL's total steps and iteration objective", "dpo_full_budget", "iter_000"),
    ("SAIL iteration 1", "sail", "iter_001"),
    ("SAIL iteration 2", "sail", "iter_002"),
    ("SAIL iteration 3", "sail", "iter_003"),
    ("SAIL iteration 2, random pairing (ranking-oriented)", "random_pairing", "iter_002"),
    ("self-distillation control iteration 2 (random pairs, random order)", "self_distillation", "iter_002"),
    ("SAIL iteration 2, no mixup (alpha = 1)", "no_mixup", "iter_002"),
    ("seed-only continuation iteration 2 (alpha = 0)", "seed_only", "iter_002"),
    ("winners-only control iteration 2 (the winner term alone)", "winners_only", "iter_002"),
    ("OnlineDPO iteration 2 (oracle-ranked)", "online_dpo", "iter_002"),
    ("DPO, seed set, SAIL's total steps", "dpo_seed_budget", "iter_000"),
    ("SSPO, seed set winners, SAIL's total steps", "sspo", "iter_000"),
)
COLUMNS = (("oracle/mean", "oracle"), ("fidelity/all", "fidelity"), ("diversity/pairwise_rms", "diversity"),
           ("self_rank_agreement", "self-rank agreement"), ("self_rank_kendall_tau", "self-rank tau"))


def total_steps(cfg: RunConfig) -> int:
    """Optimizer steps of a whole SAIL run: iteration 0's and every iteration's."""
    return cfg.train.steps + cfg.sail.iterations * (cfg.sail.train_steps or cfg.train.steps)


def arm_config(base: dict, arm: Arm, seed: int, out: Path, where: str) -> RunConfig:
    """The run config of one arm and training seed (``base``: the resolved config dict)."""
    resolved = config_from_dict(base, where)
    budget = [f"train.steps={total_steps(resolved)}"] if arm.budget else []
    if arm.iteration_loss and resolved.sail.loss is not None:
        budget.append(f"train.loss={json.dumps(to_dict(resolved.sail.loss))}")
    if arm.winners_only:
        loss = resolved.sail.loss or resolved.train.loss
        if loss.gamma <= 0:
            raise ConfigError(f"{where}: the winners_only arm trains the iterations' winner term alone; "
                              f"sail.loss has none (gamma {loss.gamma})")
        budget.append(f'sail.loss={{"name": "sft", "gamma": {loss.gamma}}}')
    overrides = list(arm.overrides) + budget + [f"seed={seed}", f"run_dir={json.dumps(str(out / f'seed{seed}' / arm.name))}",
                                       f"name={json.dumps(f'{arm.name}_seed{seed}')}"]
    return config_from_dict(apply_overrides(json.loads(json.dumps(base)), overrides, where), where)


def _link_stages(src: RunConfig, dst: RunConfig, stages: list[tuple[int, str]], subdirs: tuple[str, ...],
                 upstream: tuple[tuple[int, str], ...] = ()) -> None:
    """Start ``dst``'s run directory with ``src``'s completed ``stages`` (their ``subdirs`` hard-
    linked and their manifest entries copied), if the settings they, and the ``upstream``
    stages they read, depend on (the controller's stage table) are equal."""
    differ = _differ(src, dst, [*upstream, *stages])
    if differ:
        raise ConfigError(f"fork {src.resolved_run_dir} -> {dst.resolved_run_dir}: the forked stages depend on "
                          f"{', '.join(differ)}, which differ")
    s_dir, d_dir = src.resolved_run_dir, dst.resolved_run_dir
    s_man, d_man = Manifest(s_dir), Manifest(d_dir)
    missing = [Manifest.key(i, n) for i, n in stages if not s_man.done(i, n)]
    if missing:
        raise ConfigError(f"fork: {s_dir} has not completed {', '.join(missing)}")
    if all(d_man.done(i, n) for i, n in stages):
        return
    d_dir.mkdir(parents=True, exist_ok=True)
    for sub in subdirs:
        if (s_dir / sub).exists() and not (d_dir / sub).exists():
            _link_tree(s_dir / sub, d_dir / sub)
    settings = run_settings(dst, 1)
    for i, n in stages:
        entry = dict(s_man.get(i, n))
        d_man.record(i, n, entry.pop("outputs"), entry.pop("seconds"), forked_from=str(s_dir),
                     settings=stage_settings(settings, STAGE_TABLE[n], i))


def fork_iteration0(src: RunConfig, dst: RunConfig) -> None:
    """Start ``dst`` from ``src``'s completed base evaluation and iteration 0."""
    stages = [(0, "encode"), (0, "train")] + ([(-1, "evaluate"), (0, "evaluate")] if src.eval.enabled else [])
    lay = RunLayout.of(src)
    inside = [p for p in (lay.eval_dir(-1), lay.iteration(0), lay.seed_cache) if p.is_relative_to(lay.root)]
    _link_stages(src, dst, stages, tuple(lay.relative(p) for p in inside))


def share_iteration1_candidates(src: RunConfig, dst: RunConfig) -> None:
    """Iteration 1 generates from the shared iteration-0 model: the same candidates (same seeds),
    and, when the ranking settings are equal too, the same rewards. Link what ``src`` has."""
    man, lay = Manifest(src.resolved_run_dir), RunLayout.of(src)
    upstream = ((0, "encode"), (0, "train"))
    if man.done(1, "generate") and not _differ(src, dst, [*upstream, (1, "generate")]):
        _link_stages(src, dst, [(1, "generate")], (lay.relative(lay.candidates(1)),), upstream)
        if man.done(1, "rank") and not _differ(src, dst, [*upstream, (1, "generate"), (1, "rank")]):
            _link_stages(src, dst, [(1, "rank")], (lay.relative(lay.rewards(1)), lay.relative(lay.rewards_chunks(1))),
                         (*upstream, (1, "generate")))


def _differ(a: RunConfig, b: RunConfig, stages) -> list[str]:
    """The settings (dotted keys) that ``stages`` [(iteration, stage)] depend on and that differ
    between ``a`` and ``b``."""
    sa, sb = run_settings(a, 1), run_settings(b, 1)
    keys = {k for i, n in stages for k in {**stage_settings(sa, STAGE_TABLE[n], i), **stage_settings(sb, STAGE_TABLE[n], i)}}
    return sorted(k for k in keys if sa.get(k) != sb.get(k))


def share_base_eval(src: RunConfig, dst: RunConfig) -> None:
    """The base model's evaluation is the same for every training seed (fixed sampling seeds):
    link ``src``'s into ``dst`` instead of sampling again."""
    if src.eval.enabled and dst.eval.enabled and dst.eval.evaluate_base and Manifest(src.resolved_run_dir).done(-1, "evaluate"):
        lay = RunLayout.of(src)
        _link_stages(src, dst, [(-1, "evaluate")], (lay.relative(lay.eval_dir(-1)),))


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a finished directory by hard links (files are never rewritten in place: atomic
    writes replace them), falling back to copies across file systems."""
    tmp = dst.with_name(dst.name + ".forking")
    shutil.rmtree(tmp, ignore_errors=True)
    link_tree(src, tmp)
    os.replace(tmp, dst)


def parse_variant(spec: str) -> Arm:
    """``NAME:KEY=VALUE;KEY=VALUE``: a user arm forked from the sail arm's iteration 0 (it must
    leave everything iteration 0 depends on unchanged; the fork checks)."""
    name, sep, rest = spec.partition(":")
    overrides = tuple(o.strip() for o in rest.split(";") if o.strip())
    if not sep or not name.isidentifier() or name in ARMS or not overrides:
        raise ConfigError(f"--variant {spec!r}: expected NAME:KEY=VALUE[;KEY=VALUE...] with a new plain NAME "
                          f"(not one of {', '.join(ARMS)})")
    return Arm(name, overrides, True)


def run_arms(base: dict, where: str, seeds: list[int], arms: list[str], out: Path, run_fn,
             variants: tuple[Arm, ...] = ()) -> None:
    """Run (or resume) every arm, then every variant, for every seed; ``run_fn(cfg)`` runs one config."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"--arms: unknown {unknown}; arms: {', '.join(ARMS)}")
    known = {**ARMS, **{v.name: v for v in variants}}
    arms = list(arms) + [v.name for v in variants]
    if config_from_dict(base, where).method != "sail":
        raise ConfigError(f"{where}: the results table starts from a method 'sail' config")
    first = arm_config(base, ARMS["sail"], seeds[0], out, where)
    for seed in seeds:
        sail_cfg = arm_config(base, ARMS["sail"], seed, out, where)
        for name in arms:
            arm = known[name]
            cfg = arm_config(base, arm, seed, out, where)
            if cfg.resolved_run_dir != first.resolved_run_dir:
                share_base_eval(first, cfg)
            if arm.fork:
                if not Manifest(sail_cfg.resolved_run_dir).done(0, "train"):
                    log.info("seed %d: running iteration 0 of the sail arm first (%s forks it)", seed, name)
                    run_fn(_only_iteration0(sail_cfg))
                fork_iteration0(sail_cfg, cfg)
                share_iteration1_candidates(sail_cfg, cfg)
            log.info("seed %d: arm %s in %s", seed, name, cfg.resolved_run_dir)
            run_fn(cfg)


def _only_iteration0(cfg: RunConfig) -> RunConfig:
    """The same run directory, stopping after iteration 0 (the full sail arm resumes from it)."""
    import dataclasses

    return dataclasses.replace(cfg, sail=dataclasses.replace(cfg.sail, iterations=0))


# ---- aggregation --------------------------------------------------------------------------------
def collect(out: Path) -> dict:
    """{row label: {column: [per-seed values]}, plus per-seed evaluation s.e.} from finished runs."""
    from sail.engine.diagnostics import load_rows

    rows_of: dict[Path, list[dict]] = {}     # each run directory is read once, whatever rows use it
    table: dict = {}
    seeds = sorted(int(p.name[4:]) for p in out.glob("seed*") if p.name[4:].isdigit())
    # user variants (any other arm folder): one row per SAIL iteration found
    extra = sorted({(p.parent.name, p.name) for s in seeds for p in (out / f"seed{s}").glob("*/iter_*")
                    if p.parent.name not in ARMS and p.name != "iter_000"})
    rows = list(ROWS) + [(f"{arm} iteration {int(it[5:])}", arm, it) for arm, it in extra]
    for label, arm, it in rows:
        cols = {k: [] for k, _ in COLUMNS}
        cols["oracle/se"], cols["n_images"], cols["seeds"] = [], [], []
        for seed in seeds:
            run_dir = out / f"seed{seed}" / arm
            if not run_dir.is_dir():
                continue
            if run_dir not in rows_of:
                rows_of[run_dir] = load_rows(run_dir)
            row = next((r for r in rows_of[run_dir] if r["iteration"] == it and "oracle/mean" in r), None)
            if row is None:
                continue
            for k, _ in COLUMNS:
                cols[k].append(row.get(k))
            cols["oracle/se"].append(row.get("oracle/se"))
            cols["n_images"].append(row.get("n_images"))
            cols["seeds"].append(seed)
        table[label] = cols
    return table


def mean_se(values: list) -> tuple[float, float, int]:
    """Mean and standard error across seeds (s.e. nan with one seed); None/nan values skipped."""
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se, int(v.size)


def _cell(values: list, digits: int = 3) -> str:
    m, se, n = mean_se(values)
    if n == 0:
        return "–"
    return f"{m:.{digits}f} ± {se:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def write_table(out: Path, title: str = "Results") -> Path:
    """table.md, table.json and table.png in ``out``: mean ± s.e. across training seeds."""
    table = collect(out)
    head = "| | seeds | images/seed | " + " | ".join(c for _, c in COLUMNS) + " | eval s.e. (oracle, per seed) |"
    lines = [f"# {title}", "", "Mean ± standard error across training seeds; held-out prompts, fixed sampling seeds.",
             "", head, "|---" * (len(COLUMNS) + 4) + "|"]
    summary = {}
    for label, cols in table.items():
        if not cols["seeds"]:
            continue
        n_img = {x for x in cols["n_images"] if x is not None}
        lines.append(f"| {label} | {len(cols['seeds'])} | {'/'.join(str(x) for x in sorted(n_img)) or '–'} | "
                     + " | ".join(_cell(cols[k]) for k, _ in COLUMNS) + f" | {_cell(cols['oracle/se'])} |")
        summary[label] = {k: dict(zip(("mean", "se", "n"), mean_se(cols[k]))) for k, _ in COLUMNS}
        summary[label]["seeds"] = cols["seeds"]
        summary[label]["per_seed"] = {k: cols[k] for k, _ in COLUMNS}
    lines += ["", "![table](table.png)"]
    path = atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    write_json(out / "table.json", summary)
    _plot(out / "table.png", summary)
    return path


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary)
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4.2 * len(COLUMNS), 0.45 * len(labels) + 1.5), sharey=True)
    y = np.arange(len(labels))[::-1]
    for ax, (key, name) in zip(axes, COLUMNS):
        means = [summary[lb][key]["mean"] for lb in labels]
        ses = [0.0 if math.isnan(summary[lb][key]["se"]) else summary[lb][key]["se"] for lb in labels]
        ax.barh(y, means, xerr=ses, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def read_base_config(name: str, overrides: list[str]) -> tuple[dict, str]:
    """The base config as a plain dict (validated), and where it came from."""
    from sail.engine.config import find_config, load_config

    return config_to_dict(load_config(name, list(overrides))), str(find_config(name))
