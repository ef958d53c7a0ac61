"""SSPO's random checkpoint replay (Zhang et al., "Bridging SFT and DPO for Diffusion Model
Alignment with Self-Sampling Preference Optimization", arXiv 2410.05255; docs/method.md, SSPO).

The pool: the initial model (step 0), then a snapshot of the policy every
``sspo.checkpoint_every`` optimizer steps; it holds the newest ``sspo.pool_size``. At each step
one checkpoint is drawn uniformly from the pool (``seeds.replay_draw``): it is the step's DPO
reference, and its own samples x_ref of the batch's prompts take the second row of each pair
(the loser, or a second winner where the self-sampling switch flips it: ``kernels.dpo_loss``).
The human losers are never read.

Reference samples are not drawn step by step. The schedule (rows of each step, checkpoint of
each step) is a function of the stage seed, so when a segment of ``checkpoint_every`` steps
starts, the (checkpoint, row) combinations it will use are known: those not sampled before are
drawn in one batched, rank-parallel pass per checkpoint and cached as latents, and a
combination drawn again later is reused. That is at most one denoising chain per (step, batch
position), as fresh per-step sampling would spend, and at most one per (checkpoint, training
row), as sampling every row once per checkpoint would; and the chains run in large batches
instead of one micro-batch per step.

Files (in the stage folder; the resumable state together with the step checkpoints, removed with
them when the stage completes):

    sspo/pool/step_NNNNNN.safetensors       a checkpoint's UNet state (fp32)
    sspo/refs/step_NNNNNN_*.safetensors     rows [n] int64, latents [n, C, h, w]: its samples
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Callable

import torch

from sail.engine import hooks, seeds
from sail.engine.config import SSPOConfig
from sail.engine.data.cache import PairBatch, TrainSet
from sail.engine.io import write_safetensors
from sail.engine.models import Conditioning, unconditional_conditioning
from sail.engine.sampling import sample_conditioned

log = logging.getLogger(__name__)
_REF_FILE = re.compile(r"step_(\d+)_")


def pool_members(step: int, every: int, size: int) -> list[int]:
    """Snapshot steps in the pool at ``step``: 0, every, 2 every, ... up to ``step``, the newest ``size``."""
    return list(range(0, step // every * every + 1, every))[-size:]


def replay_checkpoint(stage_seed: int, step: int, every: int, size: int) -> int:
    """The snapshot step drawn uniformly from the pool as the reference of ``step``."""
    members = pool_members(step, every, size)
    gen = torch.Generator().manual_seed(seeds.replay_draw(stage_seed, step))
    return members[int(torch.randint(len(members), (1,), generator=gen))]


class ReplayPool:
    """The pool, its cached reference samples, and the reference module's current weights.

    model_dir: the initial model's folder; its model_index.json says how the unconditional
    branch of guidance is built (``models.unconditional_conditioning``). None: as the SDXL
    pipelines do by default (zeros for SDXL; SD1.5 always encodes ``""``)."""

    def __init__(self, cfg: SSPOConfig, folder: Path, strategy, noise_scheduler, train_set: TrainSet, *,
                 seed: int, total_steps: int, rows_of_step: Callable[[int], list[int]], model_dir: str | None = None):
        self.cfg, self.folder, self.strategy, self.train_set = cfg, Path(folder), strategy, train_set
        self.seed, self.total, self.rows_of_step = seed, total_steps, rows_of_step
        self.noise_scheduler = noise_scheduler
        # the pair cache holds the encoded "": the sampler's unconditional branch is derived from it
        self.uncond = unconditional_conditioning(Conditioning(train_set.empty_hidden, train_set.empty_pooled),
                                                 model_dir)
        self.samples: dict[tuple[int, int], torch.Tensor] = {}
        self._read: set[str] = set()
        self.loaded: int | None = None
        self.generated, self.seconds = 0, 0.0

    @property
    def pool_dir(self) -> Path:
        return self.folder / "pool"

    @property
    def refs_dir(self) -> Path:
        return self.folder / "refs"

    def checkpoint(self, step: int) -> int:
        return replay_checkpoint(self.seed, step, self.cfg.checkpoint_every, self.cfg.pool_size)

    # ---- per step ------------------------------------------------------------------------------
    def begin_step(self, step: int, first: bool) -> None:
        """At a segment's start (or the first step of a resumed stage): snapshot the policy into the
        pool and sample what the segment needs; then load the step's reference weights."""
        every = self.cfg.checkpoint_every
        if step % every == 0:
            self._snapshot(step)
        if step % every == 0 or first:
            self._prepare_segment(step)
        self._use(self.checkpoint(step))

    def with_reference_samples(self, step: int, rows: list[int], batch: PairBatch) -> PairBatch:
        """``batch`` with its second rows replaced by the step's checkpoint's samples of the same prompts."""
        k = self.checkpoint(step)
        latents = torch.stack([self.samples[(k, r)] for r in rows])
        return dataclasses.replace(batch, latents_l=latents, time_ids_l=batch.time_ids_w)

    def summary(self) -> dict:
        return {"pool": pool_members(self.total - 1, self.cfg.checkpoint_every, self.cfg.pool_size),
                "reference_samples": len(self.samples), "generated_this_run": self.generated,
                "sampling_seconds": self.seconds, "switch": self.cfg.switch}

    # ---- internals ---------------------------------------------------------------------------
    def _path(self, step: int) -> Path:
        return self.pool_dir / f"step_{step:06d}.safetensors"

    def _snapshot(self, step: int) -> None:
        have = self.strategy.broadcast_object(self._path(step).is_file() if self.strategy.is_main else None)
        if have:
            return
        state = self.strategy.policy_state_dict()        # a collective under ZeRO-3
        if self.strategy.is_main:
            write_safetensors(self._path(step), state)
        self.strategy.barrier()

    def _use(self, k: int) -> None:
        if k != self.loaded:
            from safetensors.torch import load_file

            self.strategy.load_reference(load_file(str(self._path(k))))
            self.loaded = k

    def _read_cached(self) -> None:
        from safetensors.torch import load_file

        for path in sorted(self.refs_dir.glob("step_*.safetensors")):
            if path.name in self._read:
                continue
            k, data = int(_REF_FILE.match(path.name).group(1)), load_file(str(path))
            for row, latent in zip(data["rows"].tolist(), data["latents"]):
                self.samples[(k, row)] = latent
            self._read.add(path.name)

    def _prepare_segment(self, step: int) -> None:
        every = self.cfg.checkpoint_every
        end = min((step // every + 1) * every, self.total)
        self.strategy.barrier()
        self._read_cached()
        needed = sorted({(self.checkpoint(s), r) for s in range(step, end) for r in self.rows_of_step(s)})
        # What is missing decides how many (ZeRO-3: collective) forwards each rank makes: rank 0
        # decides from its listing and tells the others, who may see the folder differently.
        missing = self.strategy.broadcast_object([x for x in needed if x not in self.samples]
                                                 if self.strategy.is_main else None)
        t0 = time.perf_counter()
        for k in sorted({k for k, _ in missing}):
            self._sample(k, [r for kk, r in missing if kk == k])
        self.strategy.barrier()
        self._read_cached()
        hooks.reached("sspo_samples", step=step)
        if missing:
            self.generated += len(missing)
            self.seconds += time.perf_counter() - t0
            log.info("sspo: %d reference samples for steps %d-%d (%d cached)", len(missing), step, end - 1,
                     len(needed) - len(missing))

    def _sample(self, k: int, rows: list[int]) -> None:
        """Rank r samples rows r, r + world, ...; every rank runs the same number of UNet calls
        (a partitioned ZeRO-3 reference needs all ranks in each forward), padding with row 0."""
        s, world, rank = self.cfg.sampling, self.strategy.world_size, self.strategy.rank
        self._use(k)
        mine = rows[rank::world]
        n_mine = len(mine)
        mine += rows[:1] * (-(-len(rows) // world) - n_mine)
        latents, shape = [], None
        for start in range(0, len(mine), s.batch_size):
            chunk = mine[start:start + s.batch_size]
            batch = self.train_set.load(chunk)
            shape = shape or tuple(batch.latents_w.shape[1:])
            out = sample_conditioned(self.strategy.reference, self.noise_scheduler,
                                     Conditioning(batch.hidden, batch.pooled), self.uncond,
                                     [seeds.reference_sample(self.seed, k, r) for r in chunk],
                                     time_ids=batch.time_ids_w, latent_shape=shape, sampling=s,
                                     progress=self.strategy.is_main)
            latents.append(out.float().cpu())
        if n_mine:
            write_safetensors(self.refs_dir / f"step_{k:06d}_from_{rows[0]}_n_{len(rows)}_rank_{rank}.safetensors",
                              {"rows": torch.tensor(mine[:n_mine], dtype=torch.int64),
                               "latents": torch.cat(latents)[:n_mine]})
