"""The SAIL controller: iterations x named, timed stages, each recorded in manifest.json.

    iteration 0:  encode -> train (DPO on the seed pairs, init = ref = base) -> evaluate
    iteration i:  generate -> rank -> pair -> mix -> train (init = ref = model_{i-1}) -> evaluate

A stage runs only if the manifest does not record it, so a killed run resumes at its first
incomplete stage; ``--stage NAME --iteration I`` runs one stage alone (its inputs must exist).
``method: online_dpo`` is the same loop ranked by an external scorer instead of the self-reward.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sail.engine import sail
from sail.engine.config import RunConfig, config_to_dict
from sail.engine.configtree import ConfigError
from sail.engine.data.cache import PairCache, TrainSet
from sail.engine.diagnostics import candidate_diagnostics, evaluate_iteration, write_report
from sail.engine.io import write_json
from sail.engine.jobs import base_model_dir, encode_seed_pairs, run_dpo_stage, seed_cache_dir
from sail.engine.manifest import Manifest
from sail.engine.strategy import Strategy, make_strategy

log = logging.getLogger(__name__)
STAGES = ("generate", "rank", "pair", "mix", "train", "evaluate")


class StageStopped(RuntimeError):
    """A stage ended early on request (``stop_at``); the run resumes from its checkpoint."""


@dataclass
class Plan:
    """What a run works on, fixed before any stage runs."""

    base_model: str
    pools: list[list[str]]
    eval_prompts: list[str]


def make_plan(cfg: RunConfig, strategy: Strategy) -> tuple[RunConfig, Plan]:
    """Resolve data and prompt pools (building the toy data once); check the pools are disjoint."""
    base = base_model_dir(cfg, strategy)
    if cfg.toy.enabled:
        from sail.engine.toy.data import ensure_toy_data, read_splits

        if strategy.is_main:
            ensure_toy_data(cfg.toy.data_dir, cfg.toy.world, base, progress=True)
        strategy.barrier()
        paths = ensure_toy_data(cfg.toy.data_dir, cfg.toy.world, base)
        splits = read_splits(paths.splits)
        data_file = paths.seed if cfg.toy.preference_set == "seed" else paths.full
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=[str(data_file)]))
        pools, eval_prompts = splits.pools[:cfg.sail.iterations], splits.eval
        _check_disjoint(pools, eval_prompts, "toy.data_dir splits")
    else:
        pools, eval_prompts = read_prompt_pools(cfg)
    return cfg, Plan(base, pools, eval_prompts)


def read_prompt_pools(cfg: RunConfig) -> tuple[list[list[str]], list[str]]:
    """A real-model run's prompt pools (one file per SAIL iteration) and evaluation prompts,
    checked: enough pools, every file readable and non-empty, no prompt in two sets."""
    iterative = cfg.method in ("sail", "online_dpo")
    if iterative and len(cfg.sail.prompt_files) < cfg.sail.iterations:
        raise ConfigError(f"sail.prompt_files: {cfg.sail.iterations} iterations need {cfg.sail.iterations} "
                          f"prompt files, got {len(cfg.sail.prompt_files)}")
    files = cfg.sail.prompt_files[:cfg.sail.iterations] if iterative else []
    pools = [sail.read_prompt_file(f, "sail.prompt_files") for f in files]
    eval_prompts = [p for f in cfg.eval.prompt_files for p in sail.read_prompt_file(f, "eval.prompt_files")]
    _check_disjoint(pools, eval_prompts, "sail.prompt_files / eval.prompt_files")
    return pools, eval_prompts


def _check_disjoint(pools: list[list[str]], eval_prompts: list[str], where: str) -> None:
    from sail.engine.toy.data import check_disjoint

    named = {f"pool_{i + 1}": p for i, p in enumerate(pools)}
    if eval_prompts:
        named["eval"] = eval_prompts
    try:
        check_disjoint(named)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


class Controller:
    """Runs the stages of a run directory in order, skipping those the manifest records."""

    def __init__(self, cfg: RunConfig, stop_at: int | None = None):
        self.stop_at = stop_at   # end a training stage early after a checkpoint (resume tests)
        self.strategy = make_strategy(cfg.train, cfg.distributed)   # rank, world, barrier
        self.cfg, self.plan = make_plan(cfg, self.strategy)
        self.run_dir = cfg.resolved_run_dir
        # Real models have no scorer wired in yet: their evaluate stages are not run, and not
        # recorded as done, so a resumed run evaluates once scorers exist.
        self.evaluates = cfg.eval.enabled and cfg.toy.enabled
        if cfg.eval.enabled and not self.evaluates:
            log.warning("evaluation: no scorer is wired in for real models yet; evaluate stages are not run")
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", config_to_dict(self.cfg))

    def it_dir(self, i: int) -> Path:
        return self.run_dir / f"iter_{i:03d}"

    def model(self, i: int) -> str:
        return self.plan.base_model if i < 0 else str(self.it_dir(i) / "model")

    def run(self, stage: str | None = None, iteration: int | None = None) -> Path:
        if stage is not None:
            self._stage(iteration if iteration is not None else 0, stage, force=True)
            return self.it_dir(iteration or 0)
        if self.evaluates and self.cfg.eval.evaluate_base:
            self._stage(-1, "evaluate")
        for name in ("encode", "train", "evaluate"):
            self._stage(0, name)
        if self.cfg.method in ("sail", "online_dpo"):
            for i in range(1, self.cfg.sail.iterations + 1):
                for name in STAGES:
                    self._stage(i, name)
        if self.strategy.is_main:
            write_report(self.run_dir, self.cfg)
        self.strategy.barrier()
        return self.run_dir / "report.md"

    def _stage(self, i: int, name: str, force: bool = False) -> None:
        if name == "evaluate" and not self.evaluates:
            if force:
                raise ConfigError("--stage evaluate: this run evaluates nothing (eval.enabled is false, or a "
                                  "real model: no scorer is wired in yet)")
            return
        # Rank 0 decides and tells the others: a rank that read the manifest after rank 0 had
        # finished and recorded a fast stage would skip it, and its barriers, and desync.
        done = self.strategy.broadcast_object(Manifest(self.run_dir).done(i, name) if self.strategy.is_main else None)
        if done and not force:
            return
        t0 = time.perf_counter()
        log.info("iteration %d: %s", i, name)
        outputs = getattr(self, f"_{name}")(i)
        if outputs is None:      # stopped early on request: not complete, not recorded
            raise StageStopped(f"iteration {i}: {name} stopped at step {self.stop_at}")
        if self.strategy.is_main:
            Manifest(self.run_dir).record(i, name, [str(o) for o in outputs], time.perf_counter() - t0)
        self.strategy.barrier()

    # ---- the stages -------------------------------------------------------------------------
    def _dist(self) -> dict:
        s = self.strategy
        return {"rank": s.rank, "world": s.world_size, "device": s.device, "barrier": s.barrier}

    def _encode(self, i: int) -> list:
        return [encode_seed_pairs(self.cfg, self.strategy, self.plan.base_model)]

    def _generate(self, i: int) -> list:
        out = self.it_dir(i) / "candidates"
        return [sail.generate_candidates(self.model(i - 1), self.plan.pools[i - 1], self.cfg.sail, out,
                                         seed=self.cfg.seed, iteration=i, **self._dist())]

    def _rank(self, i: int) -> list:
        cands, out = sail.Candidates(self.it_dir(i) / "candidates"), self.it_dir(i) / "rewards.parquet"
        if self.cfg.method == "online_dpo":
            from sail.engine.toy.scorers import get_scorer

            if self.strategy.is_main:
                sail.score_candidates_external(cands, get_scorer(self.cfg.sail.external_scorer), out)
            return [out]
        ref = {"base": -1, "anchor": 0, "previous": i - 2}[self.cfg.sail.rank_reference]
        return [sail.rank_candidates(cands, self.model(i - 1), self.model(ref), self.cfg.sail, self.cfg.train.beta,
                                     out, seed=self.cfg.seed, iteration=i, **self._dist())]

    def _pair(self, i: int) -> list:
        d = self.it_dir(i)
        if self.strategy.is_main:
            import pyarrow.parquet as pq

            from sail.engine.io import write_parquet

            cands = sail.Candidates(d / "candidates")
            pairs = sail.choose_pairs(pq.read_table(d / "rewards.parquet").to_pydict(), self.cfg.sail.pairing,
                                      self.cfg.seed + i)
            if self.cfg.toy.enabled:
                pairs.update(candidate_diagnostics(cands, pairs, d / "diagnostics.json", self.cfg.toy.world.oracle))
            write_parquet(d / "pairs.parquet", pairs)
            sail.maybe_die("pair")
            sail.build_pair_cache(cands, pairs, PairCache(seed_cache_dir(self.cfg)), d / "pairs_cache")
        return [d / "pairs.parquet", d / "pairs_cache"]

    def _mix(self, i: int) -> list:
        d = self.it_dir(i)
        if self.strategy.is_main:
            n_gen, n_seed = len(PairCache(d / "pairs_cache")), len(PairCache(seed_cache_dir(self.cfg)))
            entries = sail.mix_pairs(n_gen, n_seed, self.cfg.sail.alpha, self.cfg.seed * 31 + i)
            sail.write_mix(d / "train_set.parquet", seed_cache_dir(self.cfg), d / "pairs_cache", entries)
            sail.maybe_die("mix")
        return [d / "train_set.parquet"]

    def _train(self, i: int) -> list:
        d = self.it_dir(i)
        if i == 0:
            train_set, cfg = TrainSet.from_cache(PairCache(seed_cache_dir(self.cfg))), self.cfg
        else:
            train_set = TrainSet.read(d / "train_set.parquet")
            cfg = dataclasses.replace(self.cfg, train=iteration_train_config(self.cfg))
        ref = self.model(i - 1) if i == 0 else self.model({"previous": i - 1, "anchor": 0,
                                                                "base": -1}[self.cfg.sail.train_reference])
        run_dpo_stage(cfg, self.model(i - 1), train_set, d, seed=self.cfg.seed + 1000 * i, tag=f"iter{i}",
                      stop_at=self.stop_at, reference_model=ref)
        if self.stop_at is not None and self.stop_at < cfg.train.steps:
            return None
        return [d / "model"]

    def _evaluate(self, i: int) -> list:
        out = self.run_dir / "base_eval" if i < 0 else self.it_dir(i) / "eval"
        if self.strategy.is_main:
            evaluate_iteration(self.cfg, self.model(i), self.plan.eval_prompts, out)
            sail.maybe_die("evaluate")
        return [out]


def iteration_train_config(cfg: RunConfig):
    """cfg.train with the SAIL iterations' overrides (steps, lr, beta) applied."""
    s, t = cfg.sail, cfg.train
    optimizer = dataclasses.replace(t.optimizer, lr=s.lr) if s.lr is not None else t.optimizer
    return dataclasses.replace(t, steps=s.train_steps or t.steps, beta=s.beta if s.beta is not None else t.beta,
                               optimizer=optimizer)


def run_dpo_job(cfg: RunConfig, stop_at: int | None = None) -> Path:
    """Iteration 0 alone (method dpo); returns the trained model folder."""
    ctrl = Controller(cfg, stop_at=stop_at)
    try:
        ctrl.run()
    except StageStopped:
        pass
    return ctrl.it_dir(0) / "model"


def run_controller(cfg: RunConfig, stage: str | None = None, iteration: int | None = None) -> Path:
    if stage is not None and stage not in STAGES + ("encode",):
        raise ConfigError(f"--stage: unknown stage {stage!r}; stages: encode, {', '.join(STAGES)}")
    return Controller(cfg).run(stage, iteration)
