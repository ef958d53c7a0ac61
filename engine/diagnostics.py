"""Per-iteration diagnostics and the run report (metrics against iteration, as the paper's Fig. 2).

Tell a user whether self-amplification is working or collapsing: agreement of the self-ranking
with the oracle (toy world), the reward-margin distribution, candidate diversity, implicit
accuracy during training, held-out scores per iteration.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sail.engine.io import atomic_write, read_json, write_json
from sail.engine.layout import RunLayout

log = logging.getLogger(__name__)


def candidate_diagnostics(cands, pairs: dict, out: Path, oracle_spec: str) -> dict:
    """Oracle scores of the chosen pairs and of all candidates (pixel space); writes ``out``.
    Returns extra pair columns (oracle_w, oracle_l)."""
    from sail.engine.sampling import latents_to_uint8
    from sail.engine.toy.metrics import within_prompt_diversity
    from sail.engine.toy.oracle import load_scorer

    oracle = load_scorer(oracle_spec)
    images, prompts = [], []
    for p in range(len(cands.prompts)):
        latents, _, _ = cands.of_prompt(p)
        images.append(latents_to_uint8(latents))
        prompts += [cands.prompts[p]] * len(latents)
    images = np.concatenate(images)
    scores = np.asarray(oracle(images, prompts), dtype=np.float64).reshape(len(cands.prompts), -1)
    ow = scores[pairs["prompt_idx"], pairs["winner"]]
    ol = scores[pairs["prompt_idx"], pairs["loser"]]
    decided = ow != ol
    margins = np.array(pairs["margin"])
    diag = {
        "self_rank_agreement": float((ow > ol)[decided].mean()) if decided.any() else float("nan"),
        "pairs": len(ow),
        "oracle_gap_mean": float((ow - ol).mean()),
        "candidate_oracle_mean": float(scores.mean()),
        "reward_margin": {"mean": float(margins.mean()), "p10": float(np.percentile(margins, 10)),
                          "p50": float(np.percentile(margins, 50)), "p90": float(np.percentile(margins, 90))},
        **{f"candidates/{k}": v for k, v in within_prompt_diversity(images, prompts).items()},
    }
    write_json(out, diag)
    return {"oracle_w": ow.tolist(), "oracle_l": ol.tolist()}


def evaluate_iteration(cfg, model_dir: str, prompts: list[str], out: Path) -> dict:
    """Held-out evaluation: the toy world's pixel metrics and oracle. Real models need the
    learned scorers (PickScore, HPSv2, ...) from local weights: not wired in yet, and the
    controller does not schedule their evaluate stages."""
    from sail.engine.toy.evaluate import EvalSettings, evaluate_model

    settings = EvalSettings.from_world(cfg.toy.world)
    if cfg.eval.seeds_per_prompt:
        settings.seeds_per_prompt = cfg.eval.seeds_per_prompt
    from sail.engine.toy.scorers import world_scorer

    return evaluate_model(model_dir, out, prompts, settings, {"oracle": world_scorer("oracle", cfg.toy.world.oracle)},
                          progress=False)


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
        if i >= 0 and lay.diagnostics(i).is_file():
            diag = read_json(lay.diagnostics(i))
            row["self_rank_agreement"] = diag["self_rank_agreement"]
            row["pair_reward_margin_p50"] = diag["reward_margin"]["p50"]
            row["candidate_diversity"] = diag.get("candidates/diversity/pairwise_rms")
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(run_dir: Path, cfg) -> Path:
    """report.md (a table per iteration) and metrics.png (metrics against iteration)."""
    rows = _rows(run_dir)
    cols = [("oracle/mean", "oracle"), ("oracle/se", "s.e."), ("fidelity/all", "fidelity"),
            ("diversity/pairwise_rms", "diversity"), ("self_rank_agreement", "self-rank agreement"),
            ("pair_reward_margin_p50", "median pair margin"), ("train/implicit_acc", "train implicit acc")]
    lines = [f"# {cfg.name}: {cfg.method}", "",
             f"alpha {cfg.sail.alpha}, pairing {cfg.sail.pairing}, ranking reference {cfg.sail.rank_reference}, "
             f"N {cfg.sail.candidates}, K {cfg.sail.rank_draws}, beta {cfg.train.beta}, lr {cfg.train.optimizer.lr}", "",
             "| iteration | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['iteration']} | " + " | ".join(_fmt(row.get(k)) for k, _ in cols) + " |")
    lines += ["", "![metrics](metrics.png)", "", "Sample grids: `base_eval/samples.png`, `iter_*/eval/samples.png`."]
    path = atomic_write(RunLayout(run_dir).report, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    write_json(run_dir / "metrics.json", {r["iteration"]: {k: r.get(k) for k, _ in cols} for r in rows})
    _plot(run_dir / "metrics.png", rows, cols)
    return path


def _plot(path: Path, rows: list[dict], cols) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [c for c in cols if c[0] != "oracle/se"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    x = list(range(len(rows)))
    for ax, (key, label) in zip(axes, keys):
        ys = [r.get(key) if r.get(key) is not None else np.nan for r in rows]
        if key == "oracle/mean":
            se = [r.get("oracle/se") or 0.0 for r in rows]
            ax.errorbar(x, ys, yerr=se, marker="o", capsize=3)
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


