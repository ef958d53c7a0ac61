"""The SAIL controller: iterations x named, timed stages, each recorded in manifest.json.

    iteration 0:  encode -> train (DPO on the seed pairs, init = ref = base) -> evaluate
    iteration i:  generate -> rank -> pair -> mix -> train (init = ref = model_{i-1}) -> evaluate

A stage runs only if the manifest does not record it, so a killed run resumes at its first
incomplete stage; ``--stage NAME --iteration I`` runs one stage alone (its inputs must exist).
``method: online_dpo`` is the same loop ranked by an external scorer instead of the self-reward;
``method: sspo`` is iteration 0 with an SSPO training stage (engine/sspo.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sail.engine import hooks, sail, seeds
from sail.engine.config import RunConfig, config_to_dict
from sail.engine.configtree import ConfigError
from sail.engine.data.cache import PairCache, TrainSet
from sail.engine.diagnostics import write_report
from sail.engine.io import write_json
from sail.engine.jobs import base_model_dir, encode_seed_pairs, run_dpo_stage
from sail.engine.layout import RunLayout
from sail.engine.models import vae_scale_factor
from sail.engine.manifest import Manifest
from sail.engine.ranks import Ranks, init_ranks
from sail.engine.worlds import World, make_world

log = logging.getLogger(__name__)
ITERATION0 = ("encode", "train", "evaluate")                           # in order; STAGE_TABLE below
STAGES = ("generate", "rank", "pair", "mix", "train", "evaluate")      # each SAIL iteration i >= 1


@dataclass
class Plan:
    """What a run works on, fixed before any stage runs."""

    base_model: str
    pools: list[list[str]]
    eval_prompts: list[str]


def make_plan(cfg: RunConfig, world: World, ranks: Ranks) -> tuple[RunConfig, Plan]:
    """The base model, and the world's data (``data.train`` becomes the world's files) and prompts."""
    base = base_model_dir(cfg, ranks)
    data = world.prepare(ranks, base)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=data.train,
                                                            select=data.select or cfg.data.select))
    return cfg, Plan(base, data.pools, data.eval_prompts)


class Controller:
    """Runs the stages of a run directory in order, skipping those the manifest records."""

    def __init__(self, cfg: RunConfig):
        self.ranks = init_ranks(cfg.distributed)     # once per process; each train stage builds its engine on it
        self.world = make_world(cfg)
        self.cfg, self.plan = make_plan(cfg, self.world, self.ranks)
        self.layout = RunLayout.of(cfg)
        self.run_dir = self.layout.root
        # A world without scorers (real models, until learned scorers are wired in) does not run
        # its evaluate stages, nor record them as done: a resumed run evaluates once it can.
        self.evaluates = cfg.eval.enabled and self.world.evaluates
        if cfg.eval.enabled and not self.evaluates:
            log.warning("evaluation: world %r has no scorer wired in yet; evaluate stages are not run", cfg.world)
        if self.ranks.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.layout.config, config_to_dict(self.cfg))
            self._forecast()

    def _forecast(self) -> None:
        """Stage times forecast from the architectures' FLOPs (engine/forecast.py), logged and kept
        for the report, once per run directory."""
        from sail.engine.forecast import ASSUMED_MFU, markdown, write_run_forecast

        if self.layout.forecast.is_file():
            return
        settings = self.cfg.world_settings
        seed_pairs = settings.seed_pairs if getattr(settings, "recipe", False) else None
        rows = write_run_forecast(self.cfg, self.layout.forecast, [len(p) for p in self.plan.pools], seed_pairs,
                                  self.ranks.world_size, self.ranks.device)
        log.info("stage-time forecast (FLOPs at %.0f%% of the device peak):\n%s", 100 * ASSUMED_MFU,
                 markdown(rows, f"{self.cfg.name} on {self.ranks.world_size} device(s)"))

    def it_dir(self, i: int) -> Path:
        return self.layout.iteration(i)

    def model(self, i: int) -> str:
        return self.plan.base_model if i < 0 else str(self.layout.model(i))

    def run(self, stage: str | None = None, iteration: int | None = None) -> Path:
        if stage is not None:
            self._stage(iteration if iteration is not None else 0, stage, force=True)
            return self.it_dir(iteration or 0)
        if self.evaluates and self.cfg.eval.evaluate_base:
            self._stage(-1, "evaluate")
        for name in ITERATION0:
            self._stage(0, name)
        if self.cfg.method in ("sail", "online_dpo"):
            for i in range(1, self.cfg.sail.iterations + 1):
                for name in STAGES:
                    self._stage(i, name)
        if self.ranks.is_main:
            write_report(self.run_dir, self.cfg)
        self.ranks.barrier()
        return self.layout.report

    def _stage(self, i: int, name: str, force: bool = False) -> None:
        if name == "evaluate" and not self.evaluates:
            if force:
                raise ConfigError(f"--stage evaluate: this run evaluates nothing (eval.enabled is false, or world "
                                  f"{self.cfg.world!r} has no scorer wired in yet)")
            return
        # Rank 0 decides and tells the others: a rank that read the manifest after rank 0 had
        # finished and recorded a fast stage would skip it, and its barriers, and desync.
        done = self.ranks.broadcast_object(Manifest(self.run_dir).done(i, name) if self.ranks.is_main else None)
        if done and not force:
            return
        t0 = time.perf_counter()
        log.info("iteration %d: %s", i, name)
        outputs = STAGE_TABLE[name].run(self, i)
        if self.ranks.is_main:
            Manifest(self.run_dir).record(i, name, [str(o) for o in outputs], time.perf_counter() - t0)
        self.ranks.barrier()

    # ---- the stages: each returns its outputs (recorded in the manifest) -----------------------
    def encode(self, i: int) -> list:
        return [encode_seed_pairs(self.cfg, self.ranks, self.plan.base_model)]

    def generate(self, i: int) -> list:
        return [sail.generate_candidates(self.model(i - 1), self.plan.pools[i - 1], self.cfg.sail,
                                         self.layout.candidates(i), seed=self.cfg.seed, iteration=i, ranks=self.ranks)]

    def rank(self, i: int) -> list:
        cands, out = sail.Candidates(self.layout.candidates(i)), self.layout.rewards(i)
        if self.cfg.method == "online_dpo":
            if self.ranks.is_main:
                sail.score_candidates_external(cands, self.world.scorer(self.cfg.sail.external_scorer), out)
            return [out]
        ref = sail.rank_reference_model(self.cfg.sail.rank_reference, i)
        return [sail.rank_candidates(cands, self.model(i - 1), self.model(ref), self.cfg.sail, self.cfg.train.beta,
                                     out, seed=self.cfg.seed, iteration=i, ranks=self.ranks)]

    def pair(self, i: int) -> list:
        lay = self.layout
        if self.ranks.is_main:
            import pyarrow.parquet as pq

            from sail.engine.io import write_parquet

            cands, rewards = sail.Candidates(lay.candidates(i)), pq.read_table(lay.rewards(i)).to_pydict()
            pairs = sail.choose_pairs(rewards, self.cfg.sail.pairing, seeds.pairing(self.cfg.seed, i),
                                      self.cfg.sail.min_pair_z, self.cfg.sail.pairs_per_prompt)
            pairs.update(self.world.diagnose(cands, rewards, pairs, lay.diagnostics(i)))
            write_parquet(lay.pairs(i), pairs)
            hooks.reached("pair")
            sail.build_pair_cache(cands, pairs, PairCache(lay.seed_cache), lay.pairs_cache(i),
                                  vae_scale_factor(self.model(i - 1)))
        return [lay.pairs(i), lay.pairs_cache(i)]

    def mix(self, i: int) -> list:
        lay = self.layout
        if self.ranks.is_main:
            n_gen, n_seed = len(PairCache(lay.pairs_cache(i))), len(PairCache(lay.seed_cache))
            entries = sail.mix_pairs(n_gen, n_seed, self.cfg.sail.alpha, seeds.mixing(self.cfg.seed, i))
            sail.write_mix(lay.train_set(i), lay.seed_cache, lay.pairs_cache(i), entries)
            hooks.reached("mix")
        return [lay.train_set(i)]

    def train(self, i: int) -> list:
        if i == 0:
            train_set, cfg = TrainSet.from_cache(PairCache(self.layout.seed_cache)), self.cfg
        else:
            train_set = TrainSet.read(self.layout.train_set(i))
            cfg = dataclasses.replace(self.cfg, train=iteration_train_config(self.cfg))
        ref = self.model(i - 1) if i == 0 else self.model({"previous": i - 1, "anchor": 0,
                                                                "base": -1}[self.cfg.sail.train_reference])
        sspo = None
        if self.cfg.method == "sspo":
            sspo = dataclasses.replace(self.cfg.sspo, sampling=self.cfg.sspo.sampling or self.cfg.sail.sampling)
        run_dpo_stage(cfg, self.ranks, self.model(i - 1), train_set, self.it_dir(i), seed=seeds.stage_training(self.cfg.seed, i),
                      tag="sspo" if sspo else f"iter{i}", reference_model=ref, sspo=sspo)
        return [self.layout.model(i)]

    def evaluate(self, i: int) -> list:
        out = self.layout.eval_dir(i)
        if self.ranks.is_main:
            self.world.evaluate(self.model(i), self.plan.eval_prompts, out)
            hooks.reached("evaluate")
        return [out]


@dataclass(frozen=True)
class Stage:
    """One named stage: the controller method that runs it, what it reads and what it writes
    (paths of ``RunLayout``; ``i`` is the iteration)."""

    name: str
    run: Callable[[Controller, int], list]
    reads: str
    writes: str


STAGE_TABLE: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("encode", Controller.encode, "data.train (Pick-a-Pic parquet), the base model's VAE and text encoders",
          "cache/seed/"),
    Stage("generate", Controller.generate, "model i-1, prompt pool i", "iter_i/candidates/"),
    Stage("rank", Controller.rank, "iter_i/candidates/, model i-1 and the ranking reference (or a scorer)",
          "iter_i/rewards.parquet"),
    Stage("pair", Controller.pair, "iter_i/rewards.parquet, iter_i/candidates/",
          "iter_i/pairs.parquet, iter_i/pairs_cache/ (+ diagnostics.json where the world has a ground truth)"),
    Stage("mix", Controller.mix, "iter_i/pairs_cache/, cache/seed/", "iter_i/train_set.parquet"),
    Stage("train", Controller.train, "cache/seed/ (i = 0) or iter_i/train_set.parquet; model i-1; the DPO reference",
          "iter_i/model/, iter_i/metrics.json"),
    Stage("evaluate", Controller.evaluate, "model i (i = -1: the base model), the evaluation prompts",
          "iter_i/eval/ or base_eval/"),
)}


def iteration_train_config(cfg: RunConfig):
    """cfg.train with the SAIL iterations' overrides (steps, lr, beta, loss) applied."""
    s, t = cfg.sail, cfg.train
    optimizer = dataclasses.replace(t.optimizer, lr=s.lr) if s.lr is not None else t.optimizer
    return dataclasses.replace(t, steps=s.train_steps or t.steps, beta=s.beta if s.beta is not None else t.beta,
                               optimizer=optimizer, loss=s.loss if s.loss is not None else t.loss)


def run_controller(cfg: RunConfig, stage: str | None = None, iteration: int | None = None) -> Path:
    if stage is not None and stage not in STAGE_TABLE:
        raise ConfigError(f"--stage: unknown stage {stage!r}; stages: {', '.join(STAGE_TABLE)}")
    return Controller(cfg).run(stage, iteration)
