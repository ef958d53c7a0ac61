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
import hashlib
import json
import logging
import shutil
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
from sail.engine.models import native_resolution, use_node_cache, vae_scale_factor
from sail.engine.manifest import Manifest
from sail.engine.ranks import Ranks, init_ranks
from sail.engine.strategy import check_resumable, checkpoint_layout
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


def check_iterations_fit(cfg: RunConfig, base: str) -> None:
    """Refusals of settings an iterative run would only trip over hours in, made before any work:
    pairs at another size than the generated latents, a self-ranking against the model itself."""
    if cfg.method not in ("sail", "online_dpo") or cfg.sail.iterations < 1:
        return
    native = native_resolution(base)
    if cfg.data.resolution is not None and cfg.data.resolution != native:
        raise ConfigError(f"data.resolution: {cfg.data.resolution} px, but the model ({base}) generates at its "
                          f"native {native} px, and iteration 1 trains seed and generated pairs together; "
                          f"set data.resolution to {native} or remove it")
    if cfg.method == "sail" and cfg.sail.rank_reference == "anchor":
        raise ConfigError("sail.rank_reference: anchor (the iteration-0 model) is the very model ranked at "
                          "iteration 1, so every reward would be 0 and every pair arbitrary; use base or previous")


def make_plan(cfg: RunConfig, world: World, ranks: Ranks) -> tuple[RunConfig, Plan]:
    """The base model, and the world's data (``data.train`` becomes the world's files) and prompts."""
    base = base_model_dir(cfg, ranks)
    ranks.agreed(lambda: check_iterations_fit(cfg, base))
    data = world.prepare(ranks, base)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=data.train,
                                                            select=data.select or cfg.data.select))
    return cfg, Plan(base, data.pools, data.eval_prompts)


class Controller:
    """Runs the stages of a run directory in order, skipping those the manifest records."""

    def __init__(self, cfg: RunConfig):
        self.ranks = init_ranks(cfg.distributed)     # once per process; each train stage builds its engine on it
        # ranks sharing a node read each model folder from shared storage once (engine/models.py)
        use_node_cache(cfg.distributed.node_cache if self.ranks.local_world_size > 1 else None)
        self.world = make_world(cfg)
        self.cfg, self.plan = make_plan(cfg, self.world, self.ranks)
        self.layout = RunLayout.of(cfg)
        self.run_dir = self.layout.root
        # what a resume is checked against: the settings as given (a world's derived paths,
        # e.g. the toy world's data.train, follow from its own section)
        self.settings = {**run_settings(cfg, self.ranks.world_size), **prompt_digests(self.plan)}
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

    def order(self) -> list[tuple[int, str]]:
        """Every (iteration, stage) of the run, in the order it runs them."""
        out = [(-1, "evaluate")] + [(0, name) for name in ITERATION0]
        if self.cfg.method in ("sail", "online_dpo"):
            out += [(i, name) for i in range(1, self.cfg.sail.iterations + 1) for name in STAGES]
        return out

    def run(self, stage: str | None = None, iteration: int | None = None) -> Path:
        forced = (iteration if iteration is not None else 0, stage) if stage is not None else None
        self.ranks.agreed(lambda: self._check_resume(forced) if self.ranks.is_main else None)
        if forced is not None:
            if forced[1] == "evaluate" and not self.evaluates:
                raise ConfigError(f"--stage evaluate: this run evaluates nothing (eval.enabled is false, or world "
                                  f"{self.cfg.world!r} has no scorer wired in yet)")
            self._invalidate_from(*forced)
            self._stage(*forced, force=True)
            return self.it_dir(forced[0])
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
            return
        # Rank 0 decides and tells the others: a rank that read the manifest after rank 0 had
        # finished and recorded a fast stage would skip it, and its barriers, and desync.
        done = self.ranks.broadcast_object(Manifest(self.run_dir).done(i, name) if self.ranks.is_main else None)
        if done and not force:
            return
        t0 = time.perf_counter()
        log.info("iteration %d: %s", i, name)
        settings = stage_settings(self.settings, STAGE_TABLE[name], i)
        if self.ranks.is_main:      # a stage killed half-way resumes only with the same settings
            Manifest(self.run_dir).start(i, name, settings)
        # Every rank runs every stage (rank-0-only stages return at once on the others); a user
        # error raised on any rank ends all of them together (Ranks.agreed), never in a hang.
        outputs = self.ranks.agreed(lambda: STAGE_TABLE[name].run(self, i))
        if self.ranks.is_main:
            Manifest(self.run_dir).record(i, name, [str(o) for o in outputs], time.perf_counter() - t0,
                                          settings=settings)
        self.ranks.barrier()

    # ---- what a resume may change --------------------------------------------------------------
    def _check_resume(self, forced: tuple[int, str] | None) -> None:
        """Refuse, before any work, a resume whose settings differ from those a finished stage ran
        with, or whose training checkpoint was written by another world size or strategy. With
        ``--stage``, only the stages before the forced one count: it and what follows are
        recomputed."""
        manifest, order = Manifest(self.run_dir), self.order()
        # --stage: the stages before it that it reads (evaluations feed nothing)
        before = order if forced not in order else [s for s in order[:order.index(forced)] if s[1] != "evaluate"]
        here = checkpoint_layout(self.ranks.backend, self.ranks.world_size, self.cfg.distributed.zero_stage)
        for i, name in before:
            if name == "train" and manifest.get(i, name) is None:
                check_resumable(self.layout.checkpoints(i), here)
        changed = {}
        for i, name in before:
            record = manifest.get(i, name) or manifest.started(i, name)
            if record is not None and "settings" in record:
                # the keys the record has (a record made before a key existed, or by a fork
                # that cannot know the prompt sets, says nothing about it)
                was, now = record["settings"], stage_settings(self.settings, STAGE_TABLE[name], i)
                diffs = [(k, was[k], now.get(k, "<unset>")) for k in sorted(was) if was[k] != now.get(k, "<unset>")]
                if diffs:
                    changed[(i, name)] = diffs
        if changed:
            # the first stage whose result changes; an evaluation only when nothing else does
            i, name = min(changed, key=lambda s: (s[1] == "evaluate", order.index(s)))
            raise ConfigError(settings_changed_message(self.layout.config, i, name, changed[(i, name)]))

    def _invalidate_from(self, i: int, name: str) -> None:
        """Before ``--stage name --iteration i``: that stage's outputs, and (unless it is an
        evaluation, which nothing reads) those of every stage after it, are deleted and their
        manifest records dropped (rank 0; the others wait)."""
        if self.ranks.is_main:
            order = self.order()
            start = order.index((i, name)) if (i, name) in order else None
            doomed = [(i, name)] if start is None or name == "evaluate" else order[start:]
            manifest = Manifest(self.run_dir)
            for j, stage in doomed:
                for path in STAGE_TABLE[stage].outputs(self.layout, j):
                    _remove(path)
            manifest.forget(doomed)
            if len(doomed) > 1:
                log.info("--stage %s --iteration %d: recomputing it and the %d stage(s) after it", name, i,
                         len(doomed) - 1)
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
                                     out, self.layout.rewards_chunks(i), seed=self.cfg.seed, iteration=i, ranks=self.ranks)]

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
        self.world.evaluate(self.model(i), self.plan.eval_prompts, out, self.ranks)   # data-parallel
        if self.ranks.is_main:
            hooks.reached("evaluate")
        return [out]


@dataclass(frozen=True)
class Stage:
    """One named stage: the controller method that runs it, what it reads and what it writes
    (paths of ``RunLayout``; ``i`` is the iteration), and the config keys its result depends on
    (dotted prefixes of ``config.json``; ``iteration_depends`` only at iterations i >= 1)."""

    name: str
    run: Callable[[Controller, int], list]
    reads: str
    writes: str
    outputs: Callable[[RunLayout, int], list[Path]]
    depends: tuple[str, ...]
    iteration_depends: tuple[str, ...] = ()


# What a world's data and prompt sets depend on: the world and its section, the data files.
_DATA = ("world", "toy", "pickapic", "data.train", "data.select", "data.max_pairs", "data.max_bad_fraction",
         "data.strict", "seed", "model.path", "model.arch")

STAGE_TABLE: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("encode", Controller.encode, "data.train (Pick-a-Pic parquet), the base model's VAE and text encoders",
          "cache/seed/", lambda lay, i: [] if lay.seed_cache_dir else [lay.seed_cache],
          (*_DATA, "data.resolution", "data.random_crop", "data.random_flip", "data.cache_dir", "data.decoder",
           "data.encode_shard_pairs")),
    Stage("generate", Controller.generate, "model i-1, prompt pool i", "iter_i/candidates/",
          lambda lay, i: [lay.candidates(i)],
          (*_DATA, "sail.candidates", "sail.sampling", "sail.precision", "sail.chunk_prompts"),
          ("prompts.pool_{i}",)),
    Stage("rank", Controller.rank, "iter_i/candidates/, model i-1 and the ranking reference (or a scorer)",
          "iter_i/rewards.parquet", lambda lay, i: [lay.rewards(i), lay.rewards_chunks(i)],
          ("method", "seed", "train.beta", "sail.rank_draws", "sail.rank_t_range", "sail.rank_noise", "sail.rank_block",
           "sail.rank_settle_z", "sail.rank_min_draws", "sail.rank_reference", "sail.precision", "sail.chunk_prompts",
           "sail.external_scorer")),
    Stage("pair", Controller.pair, "iter_i/rewards.parquet, iter_i/candidates/",
          "iter_i/pairs.parquet, iter_i/pairs_cache/ (+ diagnostics.json where the world has a ground truth)",
          lambda lay, i: [lay.pairs(i), lay.pairs_cache(i), lay.diagnostics(i)],
          ("seed", "sail.pairing", "sail.pairs_per_prompt", "sail.min_pair_z")),
    Stage("mix", Controller.mix, "iter_i/pairs_cache/, cache/seed/", "iter_i/train_set.parquet",
          lambda lay, i: [lay.train_set(i)], ("seed", "sail.alpha")),
    Stage("train", Controller.train, "cache/seed/ (i = 0) or iter_i/train_set.parquet; model i-1; the DPO reference",
          "iter_i/model/, iter_i/metrics.json",
          lambda lay, i: [lay.model(i), lay.train_metrics(i), lay.checkpoints(i), lay.iteration(i) / "sspo"],
          ("train.method", "seed", "model.lora", "model.gradient_checkpointing", "data.empty_prompt_prob", "train.beta",
           "train.loss", "train.steps", "train.global_batch_pairs", "train.clip_grad_norm", "train.optimizer",
           "train.scheduler", "train.precision", "train.save_precision", "distributed.deepspeed", "sspo"),
          ("sail.train_steps", "sail.lr", "sail.beta", "sail.loss", "sail.train_reference")),
    Stage("evaluate", Controller.evaluate, "model i (i = -1: the base model), the evaluation prompts",
          "iter_i/eval/ or base_eval/", lambda lay, i: [lay.eval_dir(i)],
          ("eval.seeds_per_prompt", "eval.benchmarks", "eval.scorers", "eval.max_prompts",
           "eval.sampling", "eval.seed", "eval.chunk_images", "eval.precision", "toy.world", "prompts.eval",
           "model.path", "model.arch")),
)}

# Keys no stage's result depends on: where and how the run works, not what it computes. With
# the stages' keys they cover the whole config (tests/engine/test_controller.py checks it), so
# a field added later must be classified here or in a stage before it can ship.
FREE_KEYS = ("name", "run_dir", "model.attention", "data.encode_batch_size", "train.save_every",
             "train.keep_checkpoints", "train.log_every", "train.micro_batch_pairs", "train.grad_accum",
             # threads decoding a shard's images: the serial path's pixels, in its order, whatever the count
             "data.decode_workers",
             "distributed.backend", "distributed.zero_stage", "distributed.offload_optimizer",
             "distributed.global_batch_pairs", "sail.iterations", "sail.rank_batch_size",
             # where the DPO reference lives and which copy of a model folder a rank reads: the
             # same weights in the same dtype either way (a training checkpoint holds the policy only)
             "distributed.reference", "distributed.reference_memory_fraction", "distributed.node_cache",
             # the prompt sets count by their contents (prompts.pool_<i>, prompts.eval), so a run
             # extended by one more prompt file resumes; the recipe's split checks its own inputs
             "sail.prompt_files", "eval.prompt_files",
             "eval.enabled", "eval.evaluate_base",
             # torch.compile changes how the UNet's kernels are fused, not the model: outputs move
             # at rounding level (like a thread count), and a compile failure falls back to eager
             "train.compile", "sail.compile", "eval.compile")


def _covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flat_settings(tree: dict, prefix: str = "") -> dict:
    """``config.json``'s leaves as {dotted key: value} (dicts of user data, e.g. eval.scorers,
    stay whole below their key when empty)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "deepspeed":
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run_settings(cfg: RunConfig, world_size: int) -> dict:
    """The flat settings of a run on ``world_size`` ranks, as the stages' records keep them.
    Training depends on the global batch, not on how it is factored (a resume on another world
    size changes grad_accum), so the product is a setting of its own."""
    settings = flat_settings(config_to_dict(cfg))
    settings["train.global_batch_pairs"] = cfg.train.micro_batch_pairs * cfg.train.grad_accum * world_size
    # a training stage is DPO for every method but SSPO, whose section only SSPO reads (its
    # sampler defaults to sail.sampling: the value it runs with is the one recorded)
    settings["train.method"] = "sspo" if cfg.method == "sspo" else "dpo"
    settings = {k: v for k, v in settings.items() if not k.startswith("sspo.")}
    if cfg.method == "sspo":
        sspo = dataclasses.replace(cfg.sspo, sampling=cfg.sspo.sampling or cfg.sail.sampling)
        settings.update(flat_settings({"sspo": json.loads(json.dumps(dataclasses.asdict(sspo)))}))
    return settings


def prompt_digests(plan: "Plan") -> dict:
    """The prompt sets' contents as settings (``prompts.pool_<i>``, ``prompts.eval``): a prompt
    file edited in place under the same path changes what a finished generate or evaluate
    stage was made from."""
    def digest(prompts: list[str]) -> str:
        return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]

    out = {f"prompts.pool_{i + 1}": digest(pool) for i, pool in enumerate(plan.pools)}
    out["prompts.eval"] = digest(plan.eval_prompts)
    return out


def stage_settings(settings: dict, stage: Stage, i: int) -> dict:
    """The settings (flat) ``stage`` of iteration ``i`` depends on."""
    keys = stage.depends + tuple(k.format(i=i) for k in (stage.iteration_depends if i >= 1 else ()))
    # through JSON, as the manifest keeps them (tuples become lists)
    return json.loads(json.dumps({k: v for k, v in settings.items() if _covered(k, keys)}))


def settings_changed_message(config: Path, i: int, name: str, changes: list[tuple]) -> str:
    """One line: the stage, the keys that changed (old -> new), and the two ways on."""
    shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in changes[:4])
    if len(changes) > 4:
        shown += f" and {len(changes) - 4} more"
    after = "" if name == "evaluate" else " and every stage after it"
    return (f"{config}: the {name} stage of iteration {i} finished with other settings: {shown}. Restore them to "
            f"resume, or recompute from there: --stage {name} --iteration {i} (it discards that stage's "
            f"outputs{after}).")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def iteration_train_config(cfg: RunConfig):
    """cfg.train with the SAIL iterations' overrides (steps, lr, beta, loss) applied."""
    s, t = cfg.sail, cfg.train
    optimizer = dataclasses.replace(t.optimizer, lr=s.lr) if s.lr is not None else t.optimizer
    return dataclasses.replace(t, steps=s.train_steps or t.steps, beta=s.beta if s.beta is not None else t.beta,
                               optimizer=optimizer, loss=s.loss if s.loss is not None else t.loss)


def run_controller(cfg: RunConfig, stage: str | None = None, iteration: int | None = None) -> Path:
    if stage is not None and stage not in STAGE_TABLE:
        raise ConfigError(f"--stage: unknown stage {stage!r}; stages: {', '.join(STAGE_TABLE)}")
    controller = Controller(cfg)
    if stage is not None and (iteration if iteration is not None else 0, stage) not in controller.order():
        runs = ", ".join(f"{n} {i}" for i, n in controller.order())
        raise ConfigError(f"--stage {stage} --iteration {iteration}: this run has no such stage (its stages and "
                          f"iterations: {runs})")
    return controller.run(stage, iteration)
