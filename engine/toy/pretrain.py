"""Pretraining of the toy base model on freshly rendered images (one-off; the result ships in
engine/toy/base_model/).

Standard epsilon-prediction denoising on renders of uniformly drawn prompts, with random
(unnamed) size and position, classifier-free-guidance dropout (empty prompt), warm-up +
cosine learning-rate schedule, gradient clipping and EMA weights (the EMA is what is saved).
The text encoder is trained jointly (it is tiny); downstream DPO keeps it frozen.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sail.engine.toy.model import (ToyModelSpec, build_scheduler, build_text_encoder, build_tokenizer, build_unet,
                                   load_toy_model, save_toy_model, tokenize)
from sail.engine.toy.world import ToyWorldConfig, all_prompts, parse_prompt, render_batch, sample_layout

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Pretraining of the toy base model."""

    steps: int = 20000
    """Optimizer steps."""
    batch_size: int = 128
    """Rendered images per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 500
    """Linear warm-up steps, then cosine decay to ``min_lr_ratio`` x lr."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a fraction of the peak."""
    ema_decay: float = 0.999
    """EMA decay of the saved weights (warmed up as min(decay, (1 + step) / (10 + step)))."""
    empty_prompt_prob: float = 0.1
    """Classifier-free guidance dropout: fraction of images trained with the empty prompt."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    max_loss_weight: float = 30.0
    """Cap of the per-timestep loss weight 1 / abar_t (the v-prediction loss written for an
    epsilon model); 1 gives the plain epsilon loss. See ``timestep_weights``."""
    train_text_encoder: bool = True
    """Train the text encoder jointly (else it stays at its random initialisation)."""
    seed: int = 0
    """Seed of weights, prompts, layouts, noise and timesteps."""
    log_every: int = 100
    """Steps between loss logs (the only host syncs of the loop)."""
    save_every: int = 2000
    """Steps between (atomic) saves of the EMA model, so a long run can be inspected or stopped."""
    spec: ToyModelSpec = field(default_factory=ToyModelSpec)
    """Model sizes (ignored with ``init_from``: the folder's own sizes are used)."""
    init_from: str | None = None
    """Continue from the weights of an existing toy model folder (fresh optimizer and schedule)."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.empty_prompt_prob < 1.0:
            raise ValueError(f"empty_prompt_prob: must be in [0, 1), got {self.empty_prompt_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.max_loss_weight < 1.0:
            raise ValueError(f"max_loss_weight: must be >= 1, got {self.max_loss_weight}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")


class RenderStream:
    """An endless stream of (images in [-1, 1] [B,3,H,W], token ids [B,L]) batches."""

    def __init__(self, world: ToyWorldConfig, tokenizer, batch_size: int, empty_prompt_prob: float, seed: int):
        self.world, self.batch_size, self.p_empty = world, batch_size, empty_prompt_prob
        self.rng = np.random.default_rng(seed)
        prompts = all_prompts()
        attrs = [parse_prompt(p) for p in prompts]
        self.colour = np.array([a.colour for a in attrs])
        self.shape = np.array([a.shape for a in attrs])
        self.background = np.array([a.background for a in attrs])
        # Token ids of every prompt, plus the empty prompt in the last row: tokenized once.
        self.ids = tokenize(tokenizer, prompts + [""])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        w, n = self.world, self.batch_size
        idx = self.rng.integers(len(self.colour), size=n)
        layout = sample_layout(self.rng, n, w.image_size, w.min_shape_size, w.max_shape_size, w.margin)
        images = render_batch(self.colour[idx], self.shape[idx], self.background[idx], layout.size, layout.cx,
                              layout.cy, w.image_size)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        empty = self.rng.random(n) < self.p_empty
        ids = self.ids[np.where(empty, len(self.ids) - 1, idx)]
        return x0, ids


def lr_lambda(cfg: PretrainConfig):
    """Warm-up then cosine decay, as a multiplier of the peak lr."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over all parameters at once."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def timestep_weights(alphas_cumprod: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Loss weight per timestep: min(1 / abar_t, max_weight), normalised to mean 1 over t.

    |v - v_hat|^2 = |eps - eps_hat|^2 / abar_t, so 1 / abar_t turns the epsilon loss into the
    v-prediction loss (Salimans & Ho 2022). Plain epsilon MSE weights the error of the implied
    x0 by SNR_t, almost nothing at high noise, where the global colours are decided: sampled
    backgrounds then drift to mixtures of palette colours. The cap keeps t -> T bounded.
    """
    w = torch.clamp(1.0 / alphas_cumprod.double(), max=max_weight)
    return (w / w.mean()).float()


def denoising_loss(unet, text_encoder, scheduler, x0: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Weighted epsilon-prediction MSE at uniformly drawn timesteps (mean over pixels, then
    weighted mean over the batch); ``weights``: [num_train_timesteps] from ``timestep_weights``."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    x_t = scheduler.add_noise(x0, noise, t)
    hidden = text_encoder(ids).last_hidden_state
    per_sample = F.mse_loss(unet(x_t, t, hidden).sample, noise, reduction="none").mean(dim=(1, 2, 3))
    return (weights[t] * per_sample).mean()


def _initial_model(cfg: PretrainConfig, world: ToyWorldConfig):
    """Fresh random components, or the weights of ``cfg.init_from`` made trainable again."""
    if cfg.init_from is None:
        tokenizer = build_tokenizer()
        return (build_unet(cfg.spec, world.image_size), build_text_encoder(cfg.spec, len(tokenizer)), tokenizer,
                build_scheduler())
    model = load_toy_model(cfg.init_from)
    model.unet.train().requires_grad_(True)
    model.text_encoder.train().requires_grad_(True)
    return model.unet, model.text_encoder, model.tokenizer, model.scheduler


def _previous_record(folder: str | None) -> dict | None:
    """The pretraining record of the folder a run continues from (provenance of the phases)."""
    path = Path(folder) / "toy_pretrain.json" if folder else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def pretrain(cfg: PretrainConfig, out_dir: str | Path, world: ToyWorldConfig | None = None,
             progress: bool = True) -> dict:
    """Train the toy base model and write its diffusers folder to ``out_dir``; returns the record."""
    world = world or ToyWorldConfig()
    torch.manual_seed(cfg.seed)
    unet, text_encoder, tokenizer, scheduler = _initial_model(cfg, world)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    modules = torch.nn.ModuleList([unet, text_encoder])
    ema = copy.deepcopy(modules).requires_grad_(False)
    params = [p for p in modules.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    stream = RenderStream(world, tokenizer, cfg.batch_size, cfg.empty_prompt_prob, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = timestep_weights(scheduler.alphas_cumprod, cfg.max_loss_weight)
    record = {"config": asdict(cfg), "world": asdict(world), "losses": [],
              "unet_parameters": sum(p.numel() for p in unet.parameters()),
              "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
              "previous": _previous_record(cfg.init_from)}
    start = time.time()
    running = torch.zeros(())
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, mininterval=5)
    for step in bar:
        x0, ids = stream.next()
        loss = denoising_loss(unet, text_encoder, scheduler, x0, ids, weights, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        ema_update(ema, modules, min(cfg.ema_decay, (1 + step) / (10 + step)))
        running += loss.detach()
        if (step + 1) % cfg.log_every == 0:  # host sync only here
            mean = float(running) / cfg.log_every
            running.zero_()
            record["losses"].append({"step": step + 1, "loss": mean, "lr": sched.get_last_lr()[0],
                                     "elapsed(s)": round(time.time() - start, 1)})
            bar.set_postfix(loss=f"{mean:.4f}")
            log.info("step %d loss %.4f", step + 1, mean)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            record.update(steps_done=step + 1, duration_s=round(time.time() - start, 1))
            save_toy_model(out_dir, ema[0], ema[1], tokenizer, scheduler, record)
    return record
