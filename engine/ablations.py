"""The results table: SAIL against its baselines and ablations, over several training seeds.

Arms (each a run directory per seed, all from one base config):

    sail            the config as given: base, iteration 0 (DPO on the seed set), SAIL 1..n
    dpo_full        method dpo on the 16x "full" preference set (the all-labels baseline)
    no_mixup        SAIL with alpha = 1 (only generated pairs after iteration 0)
    random_pairing  SAIL pairing two random candidates instead of best and worst
    online_dpo      the same loop ranked by the external scorer (the oracle on the toy world)

The last three differ from ``sail`` only after iteration 0, so they fork its run directory
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

from engine.config import RunConfig, config_from_dict, config_to_dict
from engine.configtree import ConfigError, apply_overrides
from engine.io import atomic_write, read_json, write_json
from engine.manifest import Manifest

log = logging.getLogger(__name__)

# config sections iteration 0 (and the base evaluation) depend on: equal in a fork
ITER0_KEYS = ("seed", "model", "data", "train", "toy", "eval", "distributed")
# ... and the base evaluation
BASE_EVAL_KEYS = ("model", "toy.enabled", "toy.data_dir", "toy.world", "eval")


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]
    fork: bool            # fork the sail arm's iteration 0


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("sail", (), False),
    Arm("dpo_full", ('method="dpo"', 'toy.preference_set="full"'), False),
    Arm("no_mixup", ("sail.alpha=1.0",), True),
    Arm("random_pairing", ('sail.pairing="random"',), True),
    Arm("online_dpo", ('method="online_dpo"',), True),
)}

# table rows: (label, arm, iteration directory)
ROWS = (
    ("base", "sail", "base"),
    ("DPO, seed set (iteration 0)", "sail", "iter_000"),
    ("DPO, full set (16x labels)", "dpo_full", "iter_000"),
    ("SAIL iteration 1", "sail", "iter_001"),
    ("SAIL iteration 2", "sail", "iter_002"),
    ("SAIL iteration 2, no mixup (alpha = 1)", "no_mixup", "iter_002"),
    ("SAIL iteration 2, random pairing", "random_pairing", "iter_002"),
    ("OnlineDPO iteration 2 (oracle-ranked)", "online_dpo", "iter_002"),
)
COLUMNS = (("oracle/mean", "oracle"), ("fidelity/all", "fidelity"), ("diversity/pairwise_rms", "diversity"),
           ("self_rank_agreement", "self-rank agreement"))


def arm_config(base: dict, arm: Arm, seed: int, out: Path, where: str) -> RunConfig:
    """The run config of one arm and training seed (``base``: the resolved config dict)."""
    overrides = list(arm.overrides) + [f"seed={seed}", f"run_dir={json.dumps(str(out / f'seed{seed}' / arm.name))}",
                                       f"name={json.dumps(f'{arm.name}_seed{seed}')}"]
    return config_from_dict(apply_overrides(json.loads(json.dumps(base)), overrides, where), where)


def _link_stages(src: RunConfig, dst: RunConfig, keys: tuple[str, ...], stages: list[tuple[int, str]],
                 subdirs: tuple[str, ...]) -> None:
    """Start ``dst``'s run directory with ``src``'s completed ``stages`` (their ``subdirs`` hard-
    linked and their manifest entries copied), if the config ``keys`` they depend on are equal."""
    a, b = config_to_dict(src), config_to_dict(dst)
    differ = [k for k in keys if _get(a, k) != _get(b, k)]
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
    for i, n in stages:
        entry = dict(s_man.get(i, n))
        d_man.record(i, n, entry.pop("outputs"), entry.pop("seconds"), forked_from=str(s_dir))


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def fork_iteration0(src: RunConfig, dst: RunConfig) -> None:
    """Start ``dst`` from ``src``'s completed base evaluation and iteration 0."""
    stages = [(0, "encode"), (0, "train")] + ([(-1, "evaluate"), (0, "evaluate")] if src.eval.enabled else [])
    _link_stages(src, dst, ITER0_KEYS, stages, ("base_eval", "iter_000", "cache/seed"))


def share_base_eval(src: RunConfig, dst: RunConfig) -> None:
    """The base model's evaluation is the same for every training seed (fixed sampling seeds):
    link ``src``'s into ``dst`` instead of sampling again."""
    if src.eval.enabled and dst.eval.enabled and dst.eval.evaluate_base and Manifest(src.resolved_run_dir).done(-1, "evaluate"):
        _link_stages(src, dst, BASE_EVAL_KEYS, [(-1, "evaluate")], ("base_eval",))


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a finished directory by hard links (files are never rewritten in place: atomic
    writes replace them), falling back to copies across file systems."""
    tmp = dst.with_name(dst.name + ".forking")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    os.replace(tmp, dst)


def run_arms(base: dict, where: str, seeds: list[int], arms: list[str], out: Path, run_fn) -> None:
    """Run (or resume) every arm for every seed; ``run_fn(cfg)`` runs one config."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"--arms: unknown {unknown}; arms: {', '.join(ARMS)}")
    if config_from_dict(base, where).method != "sail":
        raise ConfigError(f"{where}: the results table starts from a method 'sail' config")
    first = arm_config(base, ARMS["sail"], seeds[0], out, where)
    for seed in seeds:
        sail_cfg = arm_config(base, ARMS["sail"], seed, out, where)
        for name in arms:
            arm = ARMS[name]
            cfg = arm_config(base, arm, seed, out, where)
            if cfg.resolved_run_dir != first.resolved_run_dir:
                share_base_eval(first, cfg)
            if arm.fork:
                if not Manifest(sail_cfg.resolved_run_dir).done(0, "train"):
                    log.info("seed %d: running iteration 0 of the sail arm first (%s forks it)", seed, name)
                    run_fn(_only_iteration0(sail_cfg))
                fork_iteration0(sail_cfg, cfg)
            log.info("seed %d: arm %s in %s", seed, name, cfg.resolved_run_dir)
            run_fn(cfg)


def _only_iteration0(cfg: RunConfig) -> RunConfig:
    """The same run directory, stopping after iteration 0 (the full sail arm resumes from it)."""
    import dataclasses

    return dataclasses.replace(cfg, sail=dataclasses.replace(cfg.sail, iterations=0))


# ---- aggregation --------------------------------------------------------------------------------
def collect(out: Path) -> dict:
    """{row label: {column: [per-seed values]}, plus per-seed evaluation s.e.} from finished runs."""
    from engine.diagnostics import load_rows

    table: dict = {}
    seeds = sorted(int(p.name[4:]) for p in out.glob("seed*") if p.name[4:].isdigit())
    for label, arm, it in ROWS:
        cols = {k: [] for k, _ in COLUMNS}
        cols["oracle/se"], cols["n_images"], cols["seeds"] = [], [], []
        for seed in seeds:
            run_dir = out / f"seed{seed}" / arm
            if not run_dir.is_dir():
                continue
            row = next((r for r in load_rows(run_dir) if r["iteration"] == it and "oracle/mean" in r), None)
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
    from engine.config import find_config

    path = find_config(name)
    data = apply_overrides(read_json(path), list(overrides), str(path))
    config_from_dict(json.loads(json.dumps(data)), str(path))   # validate before any work
    return data, str(path)
