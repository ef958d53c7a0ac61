"""The toy world as a run's world (``"world": "toy"``): its config section, its data, its oracle.

The data (seed and full preference sets, prompt splits) is built once from the shipped base
model (engine/toy/data.py); one setting, ``toy.world.oracle``, is the "human" everywhere: the
labels of the preference sets, the OnlineDPO ranking, the pair diagnostics and the held-out
evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from sail.engine.io import write_json
from sail.engine.toy.world import ToyWorldConfig
from sail.engine.worlds import World, WorldData, check_prompt_sets


@dataclass
class ToyConfig:
    """The ``toy`` section: where its data is built, which preference set trains, the world."""

    data_dir: str = "runs/toy_data"
    """Where the toy preference sets and splits are built (once; reused while valid)."""
    preference_set: Literal["seed", "full"] = "seed"
    """seed: the small human-labelled set; full: 16x the labels (the all-labels baseline)."""
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two rankings of the same items (ties in either count as neither
    concordant nor discordant); nan when either is constant."""
    i, j = np.triu_indices(len(a), 1)
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    denom = np.sqrt(np.count_nonzero(sa) * np.count_nonzero(sb))
    return float((sa * sb).sum() / denom) if denom else float("nan")


class ToyWorld(World):
    """Data, prompt pools and evaluation prompts from the toy world's splits; its oracle scores."""

    name = "toy"
    settings_class = ToyConfig
    evaluates = True

    @property
    def oracle(self) -> str:
        return self.settings.world.oracle

    def prepare(self, ranks, base_model: str) -> WorldData:
        from sail.engine.toy.data import ensure_toy_data, read_splits

        s = self.settings
        ranks.agreed(lambda: ensure_toy_data(s.data_dir, s.world, base_model, progress=True) if ranks.is_main else None)
        paths = ensure_toy_data(s.data_dir, s.world, base_model)
        splits = read_splits(paths.splits)
        pools, eval_prompts = splits.pools[:self.cfg.sail.iterations], splits.eval
        check_prompt_sets(pools, eval_prompts, "toy.data_dir splits")
        return WorldData([str(paths.seed if s.preference_set == "seed" else paths.full)], pools, eval_prompts)

    def evaluate(self, model_dir: str, prompts: list[str], out: Path, ranks) -> dict | None:
        """Pixel metrics (fidelity, diversity) and the oracle on fixed seeds (engine/toy/evaluate.py),
        the images sampled data-parallel over ``ranks``."""
        from sail.engine.toy.evaluate import EvalSettings, evaluate_model

        from sail.engine.strategy import resolve_precision

        settings = EvalSettings.from_world(self.settings.world)
        if self.cfg.eval.seeds_per_prompt:
            settings.seeds_per_prompt = self.cfg.eval.seeds_per_prompt
        settings.precision = resolve_precision(self.cfg.eval.precision, ranks.device)
        settings.compile = self.cfg.eval.compile
        return evaluate_model(model_dir, out, prompts, settings, {"oracle": self.scorer("oracle")}, progress=False,
                              ranks=ranks)

    def scorer(self, name: str):
        from sail.engine.toy.scorers import world_scorer

        return world_scorer(name, self.oracle)

    def diagnose(self, cands, rewards: dict, pairs: dict, out: Path) -> dict:
        """Oracle scores of the chosen pairs and of all candidates (pixel space): agreement of the
        self-ranking with the oracle on the chosen pairs and over all N candidates (Kendall tau
        per prompt, averaged), reward margins, candidate diversity; writes ``out``.
        Returns extra pair columns (oracle_w, oracle_l)."""
        from sail.engine.sampling import latents_to_uint8
        from sail.engine.toy.metrics import within_prompt_diversity

        images, prompts = [], []
        for p in range(len(cands.prompts)):
            latents, _, _ = cands.of_prompt(p)
            images.append(latents_to_uint8(latents))
            prompts += [cands.prompts[p]] * len(latents)
        images = np.concatenate(images)
        scores = np.asarray(self.scorer("oracle")(images, prompts), dtype=np.float64).reshape(len(cands.prompts), -1)
        ow = scores[pairs["prompt_idx"], pairs["winner"]]
        ol = scores[pairs["prompt_idx"], pairs["loser"]]
        decided = ow != ol
        margins = np.array(pairs["margin"])
        reward = np.full(scores.shape, np.nan)
        reward[rewards["prompt_idx"], rewards["cand"]] = rewards["reward"]
        diag = {
            "self_rank_agreement": float((ow > ol)[decided].mean()) if decided.any() else float("nan"),
            "self_rank_kendall_tau": float(np.nanmean([kendall_tau(a, b) for a, b in zip(reward, scores)])),
            "pairs": len(ow),
            "prompts_kept_fraction": len(set(pairs["prompt_idx"])) / len(cands.prompts),
            "oracle_gap_mean": float((ow - ol).mean()),
            "candidate_oracle_mean": float(scores.mean()),
            "reward_margin": {"mean": float(margins.mean()), "p10": float(np.percentile(margins, 10)),
                              "p50": float(np.percentile(margins, 50)), "p90": float(np.percentile(margins, 90))},
            **{f"candidates/{k}": v for k, v in within_prompt_diversity(images, prompts).items()},
        }
        write_json(out, diag)
        return {"oracle_w": ow.tolist(), "oracle_l": ol.tolist()}
