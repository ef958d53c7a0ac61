"""How well the self-ranking carries the oracle's preference, against its cost (toy world).

For one SAIL iteration of a finished run: every prompt's candidates are ranked once with
``max_draws`` (t, noise) draws (the run's models, ranking reference, seeds and timestep
window), and the oracle scores them. Prefixes of those draws then give, without more UNet
calls, what K draws would have chosen, and what adaptive K (``sail.rank_block``,
``sail.rank_settle_z``) would have chosen and spent, because both use prefixes of the same
draw sequence (``engine.sail.reward_prompt``).

Per K and per adaptive setting: agreement of the best-worst pair with the oracle (decided
pairs), Kendall tau of rewards and oracle over the N candidates (mean over prompts), the
fraction of prompts whose pair equals the ``max_draws`` pair, and the UNet forwards as a
fraction of ``max_draws``'s. Writes ``rank_study.json``, ``rank_study.png`` and the raw
per-draw rewards and oracle scores (``per_draw.safetensors``: ``draws_<p>`` [N, max_draws],
``oracle_<p>`` [N]), from which other rules can be evaluated offline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from sail.engine.configtree import ConfigError, require


@dataclass
class RankStudyConfig:
    """What to measure."""

    iteration: int = 1
    """The SAIL iteration whose candidates are ranked (its model i-1 and ranking reference)."""
    max_draws: int = 64
    """Draws per prompt of the one ranking pass; the reference answer."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 10, 16, 32, 64])
    """Fixed K to evaluate (prefixes; at most max_draws)."""
    block: int = 2
    """Adaptive K: draws per block."""
    settle_z: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    """Adaptive K: the stopping thresholds to evaluate."""
    min_draws: list[int] = field(default_factory=lambda: [0])
    """Adaptive K: draws before the first settle test (each with each threshold)."""
    prompts: int | None = None
    """Only the first N prompts (None: all)."""
    t_range: tuple[float, float] | None = None
    """Timestep window of the draws (None: the run's sail.rank_t_range)."""
    noise: Literal["shared", "antithetic", "own"] | None = None
    """Noise of the draws (None: the run's sail.rank_noise)."""
    reference: Literal["base", "anchor", "previous"] | None = None
    """Reference of the implicit reward (None: the run's sail.rank_reference)."""

    def __post_init__(self):
        require(self.iteration >= 1, "iteration", "must be >= 1")
        require(self.max_draws >= 2, "max_draws", "must be >= 2")
        require(all(1 <= k <= self.max_draws for k in self.ks), "ks", f"must be in 1..max_draws, got {self.ks}")
        require(self.block >= 1 and all(z > 0 for z in self.settle_z), "block", "block >= 1 and settle_z > 0")
        require(all(0 <= m <= self.max_draws for m in self.min_draws), "min_draws", "must be in 0..max_draws")
        require(self.t_range is None or 0.0 <= self.t_range[0] < self.t_range[1] <= 1.0, "t_range",
                f"must be 0 <= lo < hi <= 1, got {self.t_range}")


def _pair(per_draw: np.ndarray, pairing: str = "best_worst") -> tuple[int, int]:
    from sail.engine.sail import pick_pairs

    return pick_pairs(per_draw.mean(1), pairing)[0]


def adaptive_draws(per_draw: np.ndarray, block: int, settle_z: float, min_draws: int = 0) -> int:
    """The draws adaptive K would use on this prompt: the ranking's own rule
    (``engine.sail.draws_until_settled``) run on the prefixes of ``per_draw``."""
    from sail.engine.sail import draws_until_settled

    values = torch.from_numpy(per_draw)
    return draws_until_settled(lambda sl: values[:, sl], per_draw.shape[1], block, settle_z, min_draws).shape[1]


def analyse(per_draws: list[np.ndarray], oracle: list[np.ndarray], cfg: RankStudyConfig) -> list[dict]:
    """Rows (one per fixed K and per adaptive threshold) from each prompt's per-draw rewards
    [N, max_draws] and oracle scores [N]."""
    from sail.engine.toy.plugin import kendall_tau

    reference = {p: [_pair(d, p) for d in per_draws] for p in ("best_worst", "best_mu2sigma")}  # at max_draws

    def row(name: str, used: list[int], pairing: str = "best_worst") -> dict:
        pairs = [_pair(d[:, :k], pairing) for d, k in zip(per_draws, used)]
        decided = [(o[w], o[l]) for (w, l), o in zip(pairs, oracle) if o[w] != o[l]]
        taus = [kendall_tau(d[:, :k].mean(1), o) for d, k, o in zip(per_draws, used, oracle)]
        return {"setting": name, "draws_mean": float(np.mean(used)),
                "forwards_fraction": float(np.mean(used)) / cfg.max_draws,
                "agreement": float(np.mean([a > b for a, b in decided])) if decided else float("nan"),
                "kendall_tau": float(np.nanmean(taus)),
                "same_pair_as_max": float(np.mean([p == r for p, r in zip(pairs, reference[pairing])]))}

    rows = [row(f"K={k}", [k] * len(per_draws)) for k in cfg.ks]
    rows += [row(f"adaptive block {cfg.block}, z {z}" + (f", min {m}" if m else ""),
                 [adaptive_draws(d, cfg.block, z, m) for d in per_draws])
             for m in cfg.min_draws for z in cfg.settle_z]
    # the other pair choice, at K = 10 and max_draws ("same pair" against its own choice at max_draws)
    rows += [row(f"best vs mu - 2 sigma, K={k}", [k] * len(per_draws), "best_mu2sigma")
             for k in sorted({min(10, cfg.max_draws), cfg.max_draws})]
    return rows


def rank_study(run_dir: str | Path, out_dir: str | Path, cfg: RankStudyConfig, progress: bool = True) -> list[dict]:
    """Rank the iteration's candidates once with ``max_draws`` draws, score them with the
    world's oracle, write the rows (``analyse``) and their plot."""
    from sail.engine import seeds
    from sail.engine.config import config_from_dict
    from sail.engine.io import read_json, write_json, write_safetensors
    from sail.engine.layout import RunLayout
    from sail.engine.models import load_components, load_unet, vae_scale_factor
    from sail.engine.sail import Candidates, rank_reference_model, reward_prompt
    from sail.engine.sampling import latents_to_uint8
    from sail.engine.worlds import make_world

    lay = RunLayout(Path(run_dir))
    run_cfg = config_from_dict(read_json(lay.config), str(lay.config))
    world, i = make_world(run_cfg), cfg.iteration
    if not world.evaluates:
        raise ConfigError(f"{lay.config}: world {run_cfg.world!r} has no oracle to compare the ranking with")
    base = run_cfg.model.resolved_path() or str(lay.base_model)
    model = {j: (base if j < 0 else str(lay.model(j))) for j in (-1, 0, i - 2, i - 1)}
    reference = cfg.reference or run_cfg.sail.rank_reference
    cur_dir, ref_dir = model[i - 1], model[rank_reference_model(reference, i)]
    if cur_dir == ref_dir:
        raise ConfigError(f"reference: at iteration {i} the {reference!r} reference is the ranked model itself "
                          f"(every reward would be 0)")
    comps = load_components(cur_dir, with_text=False, with_vae=False)
    cur, ref = comps.unet.eval(), load_unet(ref_dir).eval()
    cands = Candidates(lay.candidates(i))
    oracle = world.scorer("oracle")
    per_draws, scores = [], []
    n_prompts = len(cands.prompts) if cfg.prompts is None else min(cfg.prompts, len(cands.prompts))
    for p in tqdm(range(n_prompts), desc="rank study", disable=not progress, mininterval=2):
        latents, hidden, pooled = cands.of_prompt(p)
        _, per = reward_prompt(cur, ref, comps.noise_scheduler, latents, hidden, pooled, draws=cfg.max_draws,
                               beta=run_cfg.train.beta, seed=seeds.ranking_draws(run_cfg.seed, i, p),
                               batch=run_cfg.sail.rank_batch_size, vae_factor=vae_scale_factor(cur_dir),
                               t_range=cfg.t_range or run_cfg.sail.rank_t_range,
                               noise=cfg.noise or run_cfg.sail.rank_noise, cand_seeds=cands.seeds_of(p))
        per_draws.append(per.double().numpy())
        scores.append(np.asarray(oracle(latents_to_uint8(latents), [cands.prompts[p]] * len(latents)), np.float64))
    rows = analyse(per_draws, scores, cfg)
    out = Path(out_dir)
    # the raw per-draw rewards and oracle scores: other K rules can be studied without UNet calls
    write_safetensors(out / "per_draw.safetensors",
                      {**{f"draws_{p}": torch.from_numpy(d) for p, d in enumerate(per_draws)},
                       **{f"oracle_{p}": torch.from_numpy(o) for p, o in enumerate(scores)}})
    write_json(out / "rank_study.json", {"run": str(run_dir), "config": asdict(cfg), "prompts": n_prompts,
                                         "candidates": int(per_draws[0].shape[0]), "rows": rows})
    _plot(out / "rank_study.png", rows, cfg)
    return rows


def _plot(path: Path, rows: list[dict], cfg: RankStudyConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sail.engine.io import atomic_write

    fixed = [r for r in rows if r["setting"].startswith("K=")]
    adaptive = [r for r in rows if r["setting"].startswith("adaptive")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key in zip(axes, ("agreement", "kendall_tau", "same_pair_as_max")):
        ax.plot([r["forwards_fraction"] for r in fixed], [r[key] for r in fixed], marker="o", label="fixed K")
        ax.scatter([r["forwards_fraction"] for r in adaptive], [r[key] for r in adaptive], color="C3",
                   marker="s", label=f"adaptive (block {cfg.block})", zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel(f"UNet forwards / those of K = {cfg.max_draws}", fontsize=8)
        ax.set_title(key.replace("_", " "), fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
