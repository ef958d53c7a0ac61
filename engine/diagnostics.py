"""The run report: metrics against iteration, as the paper's Fig. 2.

Tell a user whether self-amplification is working or collapsing: held-out scores per
iteration, implicit accuracy during training and, where the world has a ground truth (its
``diagnose``, written as ``iter_i/diagnostics.json``), agreement of the self-ranking with it,
the reward-margin distribution and candidate diversity.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sail.engine.io import atomic_write, read_json, write_json
from sail.engine.layout import RunLayout

log = logging.getLogger(__name__)


def _rows(run_dir: Path) -> list[dict]:
    lay = RunLayout(run_dir)
    rows = []
    labelled = [("base", -1)] + [(d.name, int(d.name[5:])) for d in lay.iterations()]
    for name, i in labelled:
        row = {"iteration": name}
        if (lay.eval_dir(i) / "metrics.json").is_file():
            row.update(read_json(lay.eval_dir(i) / "metrics.json"))
        if i >= 0 and lay.train_metrics(i).is_file():
            final = read_json(lay.train_metrics(i)).get("final", {})
            row["train/implicit_acc"] = final.get("implicit_acc")
            row["train/reward_margin"] = final.get("reward_margin")
            row["train/winner_worse"] = final.get("winner_worse")
        if i >= 0 and lay.diagnostics(i).is_file():
            diag = read_json(lay.diagnostics(i))
            row["self_rank_agreement"] = diag["self_rank_agreement"]
            row["self_rank_kendall_tau"] = diag.get("self_rank_kendall_tau")
            row["pair_reward_margin_p50"] = diag["reward_margin"]["p50"]
            row["candidate_diversity"] = diag.get("candidates/diversity/pairwise_rms")
        rows.append(row)
    return rows


def _objective(loss) -> str:
    return {"dpo": "dpo", "dpo_sft": f"dpo_sft gamma {loss.gamma}", "dpop": f"dpop lam {loss.lam}",
            "sft": f"sft gamma {loss.gamma} (no DPO term)"}[loss.name]


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(run_dir: Path, cfg) -> Path:
    """report.md (a table per iteration) and metrics.png (metrics against iteration)."""
    rows = _rows(run_dir)
    cols = [("oracle/mean", "oracle"), ("oracle/se", "s.e."), ("fidelity/all", "fidelity"),
            ("diversity/pairwise_rms", "diversity"), ("self_rank_agreement", "self-rank agreement"),
            ("self_rank_kendall_tau", "self-rank tau"), ("pair_reward_margin_p50", "median pair margin"),
            ("train/implicit_acc", "train implicit acc"), ("train/winner_worse", "train winner-worse (SSPO switch)")]
    # learned scorers (a real-model run with eval.scorers): <benchmark>/<scorer>/mean, the paper's Figure 2
    cols += [(k, k[:-len("/mean")]) for k in sorted({k for r in rows for k in r if k.count("/") == 2 and k.endswith("/mean")})]
    if not any(r.get("oracle/mean") is not None for r in rows):   # no ground truth: only the columns measured
        cols = [c for c in cols if any(r.get(c[0]) is not None for r in rows)] or cols[:1]
    if cfg.method == "sspo":
        s = cfg.sspo
        settings = (f"SSPO: pool of {s.pool_size}, a checkpoint every {s.checkpoint_every} steps, switch {s.switch}, "
                    f"{cfg.train.steps} steps, beta {cfg.train.beta}, lr {cfg.train.optimizer.lr}, "
                    f"loss {_objective(cfg.train.loss)}")
    else:
        settings = (f"alpha {cfg.sail.alpha}, pairing {cfg.sail.pairing}, ranking reference {cfg.sail.rank_reference}, "
                    f"N {cfg.sail.candidates}, K {cfg.sail.rank_draws}, beta {cfg.train.beta}, lr {cfg.train.optimizer.lr}, "
                    f"loss {_objective(cfg.train.loss)} (iterations: {_objective(cfg.sail.loss or cfg.train.loss)})")
    lines = [f"# {cfg.name}: {cfg.method}", "", settings, "",
             "| iteration | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['iteration']} | " + " | ".join(_fmt(row.get(k)) for k, _ in cols) + " |")
    lines += ["", "![metrics](metrics.png)", "", "Sample grids: `base_eval/samples.png`, `iter_*/eval/samples.png`."]
    lines += _stage_times(RunLayout(run_dir))
    path = atomic_write(RunLayout(run_dir).report, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    write_json(run_dir / "metrics.json", {r["iteration"]: {k: r.get(k) for k, _ in cols} for r in rows})
    _plot(run_dir / "metrics.png", rows, cols)
    return path


def _stage_times(lay: RunLayout) -> list[str]:
    """The stage times measured (manifest) beside the forecast made at the start (forecast.json)."""
    from sail.engine.manifest import Manifest

    if not lay.forecast.is_file():
        return []
    fc = read_json(lay.forecast)
    man = Manifest(lay.root)
    lines = ["", f"Stage times: measured, and forecast at the start from the UNet's FLOPs at {fc['mfu']:.0%} of "
             f"{fc['peak_flops'] / 1e12:.2f} TFLOP/s ({fc['peak_source']}); see docs/cluster.md.", "",
             "| iteration | stage | forecast s | measured s |", "|---|---|---|---|"]
    for r in fc["rows"]:
        entry = man.get(r["iteration"], r["stage"]) if man.done(r["iteration"], r["stage"]) else None
        measured = f"{entry['seconds']:.1f}" if entry and "forked_from" not in entry else "–"
        lines.append(f"| {r['iteration']} | {r['stage']} | {r['seconds']:.1f} | {measured} |")
    return lines


def _plot(path: Path, rows: list[dict], cols) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [c for c in cols if c[0] != "oracle/se"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    axes = axes[0]
    x = list(range(len(rows)))
    for ax, (key, label) in zip(axes, keys):
        ys = [r.get(key) if r.get(key) is not None else np.nan for r in rows]
        if key == "oracle/mean":
            se = [r.get("oracle/se") or 0.0 for r in rows]
            ax.errorbar(x, ys, yerr=se, marker="o", capsize=3)
        elif key.count("/") == 2:   # a learned scorer's mean and its bootstrap interval
            base = key[:-len("mean")]
            err = [[y - (r.get(base + "lo") if r.get(base + "lo") is not None else y) for y, r in zip(ys, rows)],
                   [(r.get(base + "hi") if r.get(base + "hi") is not None else y) - y for y, r in zip(ys, rows)]]
            ax.errorbar(x, ys, yerr=err, marker="o", capsize=3)
        else:
            ax.plot(x, ys, marker="o")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(x, [r["iteration"].replace("iter_", "") for r in rows], fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def load_rows(run_dir: str | Path) -> list[dict]:
    """The report's rows (for tables across runs)."""
    return _rows(Path(run_dir))


