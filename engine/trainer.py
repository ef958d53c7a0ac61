"""One Diffusion-DPO training stage (docs/method.md, Diffusion-DPO) over a pre-encoded TrainSet.

Determinism: the pair order (a permutation per epoch), each pair's timestep and noise, and
the empty-prompt dropout are functions of (seed, step, position in the global batch) alone,
so a run gives the same updates on 1 process or N ranks and after a resume.
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sail.engine.compilation import call
from sail.engine.config import LossConfig, SSPOConfig, TrainConfig
from sail.engine.data.cache import PairBatch, TrainSet
from sail.engine.io import write_json
from sail.engine.losses import dpo_loss
from sail.engine.lora import reference_forward
from sail.engine import hooks, seeds
from sail.engine.strategy import Strategy

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a training stage hands to the next one."""

    steps: int
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    sspo: dict | None = None
    """SSPO stages: the replay pool's summary (engine/sspo.py)."""
    resumed_from: int = 0
    """The step the stage's last run started from (0: from the start; k: a checkpoint of step k)."""


class PairSchedule:
    """Which pair, timestep, noise and dropout each global-batch position of each step gets."""

    def __init__(self, num_pairs: int, global_batch: int, seed: int, num_timesteps: int, empty_prob: float):
        self.n, self.g, self.seed = num_pairs, global_batch, seed
        self.num_timesteps, self.empty_prob = num_timesteps, empty_prob
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(seeds.pair_order(self.seed, epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}
        return self._perms[epoch]

    def pairs(self, step: int, positions: range) -> list[int]:
        out = []
        for p in positions:
            k = step * self.g + p
            out.append(int(self._perm(k // self.n)[k % self.n]))
        return out

    def draws(self, step: int, positions: range, latent_shape: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """timesteps [b] long, noise [b, *latent_shape], empty-prompt mask [b] bool."""
        ts, noise, empty = [], [], []
        for p in positions:
            gen = torch.Generator().manual_seed(seeds.pair_draw(self.seed, step, p))
            ts.append(torch.randint(0, self.num_timesteps, (1,), generator=gen))
            empty.append(torch.rand(1, generator=gen) < self.empty_prob)
            noise.append(torch.randn((1, *latent_shape), generator=gen))
        return torch.cat(ts), torch.cat(noise), torch.cat(empty)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def dpo_forward(strategy: Strategy, noise_scheduler, batch: PairBatch, t: torch.Tensor, noise: torch.Tensor,
                empty: torch.Tensor, empty_hidden: torch.Tensor, empty_pooled: torch.Tensor | None, beta: float,
                objective: LossConfig | None = None, self_sampling: bool = False):
    """Policy and reference predictions on [winners; losers] with shared t and noise; the loss
    (``self_sampling``: SSPO's switch, the losers being reference samples)."""
    dev, dtype = strategy.device, strategy.compute_dtype
    latents = torch.cat([batch.latents_w, batch.latents_l]).to(dev)
    t2, noise2 = torch.cat([t, t]).to(dev), torch.cat([noise, noise]).to(dev)
    hidden = torch.where(empty[:, None, None], empty_hidden.to(batch.hidden), batch.hidden)
    x_t = noise_scheduler.add_noise(latents, noise2, t2)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise2, t2)   # per sample: [2P, ...]
    else:
        target = noise.to(dev)                                        # shared by the pair: [P, ...]
    kwargs = {"encoder_hidden_states": torch.cat([hidden, hidden]).to(dev, dtype)}
    if batch.pooled is not None:
        pooled = torch.where(empty[:, None], empty_pooled.to(batch.pooled), batch.pooled)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat([pooled, pooled]).to(dev, dtype),
                                       "time_ids": torch.cat([batch.time_ids_w, batch.time_ids_l]).to(dev, dtype)}
    x_in = x_t.to(dtype)
    with strategy.autocast():
        model_pred = call(strategy.policy, x_in, t2, **kwargs).sample
        with torch.no_grad():   # LoRA mode: no reference model, the policy with adapters off
            ref_pred = reference_forward(strategy.policy, strategy.reference, x_in, t2, **kwargs).sample
    return dpo_loss(model_pred, ref_pred, target, beta, self_sampling=self_sampling,
                    **(objective.kernel_weights() if objective else {}))


def train_dpo(cfg: TrainConfig, strategy: Strategy, noise_scheduler, train_set: TrainSet, run_dir: Path, *,
              seed: int, empty_prompt_prob: float, tag: str = "dpo", sspo: SSPOConfig | None = None,
              model_dir: str | None = None) -> StageResult:
    """Train ``strategy.policy`` against ``strategy.reference`` for ``cfg.steps`` optimizer steps,
    resuming from ``run_dir/checkpoints`` when a checkpoint is there.

    With ``sspo``: SSPO (engine/sspo.py) on the winners of ``train_set``; the reference is a
    checkpoint drawn from the replay pool each step and the second row of each pair its sample."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    micro, world = cfg.micro_batch_pairs, strategy.world_size
    global_batch = micro * cfg.grad_accum * world
    latent_shape = tuple(train_set.load([0]).latents_w.shape[1:])
    schedule = PairSchedule(len(train_set), global_batch, seed, noise_scheduler.config.num_train_timesteps,
                            empty_prompt_prob)
    client = strategy.load_checkpoint(ckpt_dir)
    start = client["step"] if client else 0
    if start:
        log.info("%s: resumed from the checkpoint of step %d of %d", tag, start, cfg.steps)
    history = list(client.get("history", [])) if client else []
    replay = None
    if sspo is not None:
        from sail.engine.sspo import ReplayPool

        replay = ReplayPool(sspo, run_dir / "sspo", strategy, noise_scheduler, train_set, seed=seed,
                            total_steps=cfg.steps, rows_of_step=lambda s: schedule.pairs(s, range(global_batch)),
                            model_dir=model_dir)
    writer = _tensorboard(run_dir, tag) if strategy.is_main else None
    sums = torch.zeros(8, device=strategy.device)   # loss, acc, margin, mw, ml, rw, rl, worse: synced at log steps
    count, t0 = 0, time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=tag, disable=not strategy.is_main, initial=start,
               total=cfg.steps)
    for step in bar:
        if replay is not None:     # the step's reference checkpoint (and, at a segment start, its samples)
            replay.begin_step(step, first=step == start)
        # ---- forward / backward over the accumulation micro-batches -------------------------
        for m in range(cfg.grad_accum):
            first = m * micro * world + strategy.rank * micro
            positions = range(first, first + micro)
            rows = schedule.pairs(step, positions)
            batch = train_set.load(rows)
            if replay is not None:
                batch = replay.with_reference_samples(step, rows, batch)
            t, noise, empty = schedule.draws(step, positions, latent_shape)
            out = dpo_forward(strategy, noise_scheduler, batch, t, noise, empty, train_set.empty_hidden,
                              train_set.empty_pooled, cfg.beta, cfg.loss,
                              self_sampling=replay is not None and replay.cfg.switch)
            strategy.backward(out.loss)
            strategy.step()
            w, l = out.model_err.chunk(2), out.ref_err.chunk(2)
            sums += torch.stack([out.loss.detach().float(), (out.z > 0).float().mean(), out.z.mean(),
                                 w[0].mean(), w[1].mean(), l[0].mean(), l[1].mean(), out.winner_worse.mean()])
            count += 1
        done = step + 1
        # ---- logging: the only host syncs of the loop ------------------------------------------
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = _log_row(strategy, sums / count, done, global_batch * (done - start) / (time.perf_counter() - t0))
            history.append(row)
            if writer is not None:
                for key, value in row.items():
                    if key != "step":
                        writer.add_scalar(f"{tag}/{key}", value, done)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}")
            sums.zero_()
            count = 0
        # ---- checkpoint --------------------------------------------------------------------------
        if cfg.save_every and done % cfg.save_every == 0:
            strategy.save_checkpoint(ckpt_dir, done, {"step": done, "history": history})
            hooks.reached("train", step=done)
    if writer is not None:
        writer.close()
    final = {k: v for k, v in history[-1].items()} if history else {}
    return StageResult(steps=cfg.steps, metrics=final, history=history,
                       sspo=replay.summary() if replay is not None else None, resumed_from=start)


def _log_row(strategy: Strategy, means: torch.Tensor, step: int, pairs_per_s: float) -> dict:
    means = strategy.all_reduce_mean(means).tolist()
    # winner_worse: share of pairs with e_theta(w) > e_ref(w); under SSPO the switch rate.
    keys = ["loss", "implicit_acc", "reward_margin", "model_err_w", "model_err_l", "ref_err_w", "ref_err_l",
            "winner_worse"]
    row = {"step": step, **dict(zip(keys, means))}
    row.update(lr=strategy.lr(), grad_norm=float(strategy.grad_norm()), pairs_per_s=pairs_per_s,
               **{"memory_peak_gib": _peak_memory_gib(strategy.device)})
    return row


def _tensorboard(run_dir: Path, tag: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an install requirement; stay usable without it
        return None
    return SummaryWriter(str(run_dir / "tb"))


def write_stage_metrics(path: Path, result: StageResult, extra: dict) -> None:
    write_json(path, {"steps": result.steps, "resumed_from_step": result.resumed_from, "final": result.metrics,
                      "history": result.history, **extra})
