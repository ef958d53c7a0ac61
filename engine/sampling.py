"""Classifier-free-guided sampling with diffusers schedulers, reproducible per sample.

Every sample owns a ``torch.Generator`` seeded by its seed; its initial noise and every
per-step noise draw (DDPM, or DDIM with eta > 0) come from that generator alone. A sample
therefore does not depend on how the samples are batched, in which order they are drawn or
which process draws it: SAIL candidate generation can shard prompts over ranks freely and
still reproduce a candidate from its (prompt, seed). Noise is drawn on the CPU and moved,
so the same seed gives the same noise on any device.

Used for SD1.5 / SDXL latents and for pixel-space models (the toy world), where the
"latents" are the images in [-1, 1].
"""
from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from tqdm import tqdm

from sail.engine.compilation import call

if TYPE_CHECKING:
    from sail.engine.config import SamplingConfig
    from sail.engine.models import Conditioning


def _expand_rows(t: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
    """Rows ``rows`` of a per-sample tensor, or a single shared row repeated n times."""
    return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t[rows]


def _cfg_inputs(cond, uncond, added_cond, added_uncond, rows: slice, n: int, use_cfg: bool):
    """Encoder states and added conditioning of one chunk, unconditional rows first."""
    hidden = _expand_rows(cond, rows, n)
    added = None if added_cond is None else {k: _expand_rows(v, rows, n) for k, v in added_cond.items()}
    if not use_cfg:
        return hidden, added
    hidden = torch.cat([_expand_rows(uncond, rows, n), hidden])
    if added is not None:
        added = {k: torch.cat([_expand_rows(added_uncond[k], rows, n), v]) for k, v in added.items()}
    return hidden, added


def sampling_scheduler(noise_scheduler, sampler: str):
    """The sampler (``ddim``: DDIM, eta 0; ``ddpm``) built from a model's own scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    return cls.from_config(noise_scheduler.config)


def _initial_noise(generators: list[torch.Generator], latent_shape: Sequence[int]) -> torch.Tensor:
    """One draw per sample from its own generator (CPU, float32): [n, *latent_shape]."""
    return torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in generators])


def initial_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """The starting noise ``sample_latents`` draws for these seeds: float32 [n, *latent_shape]."""
    return _initial_noise([torch.Generator().manual_seed(int(s)) for s in seeds], latent_shape)


@torch.no_grad()
def _sample_chunk(unet, scheduler, x: torch.Tensor, hidden, added, generators, guidance_scale: float,
                  use_cfg: bool, bar) -> torch.Tensor:
    """Run the whole reverse process for one chunk of samples (x: float32 on the UNet's device)."""
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generators} if accepts_generator else {}
    dtype = next(unet.parameters()).dtype
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if use_cfg else x
        model_in = scheduler.scale_model_input(model_in, t).to(dtype)
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        out = call(unet, model_in, t, encoder_hidden_states=hidden, **kwargs).sample.float()
        if use_cfg:
            uncond_out, cond_out = out.chunk(2)
            out = uncond_out + guidance_scale * (cond_out - uncond_out)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        if bar is not None:
            bar.update(1)
    return x


@torch.no_grad()
def sample_latents(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor | None, seeds: Sequence[int], *,
                   num_steps: int, guidance_scale: float, latent_shape: Sequence[int], batch_size: int,
                   added_cond: dict | None = None, added_uncond: dict | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Draw one sample per seed with classifier-free guidance: float32 [B, *latent_shape].

    unet: a UNet2DConditionModel (any dtype, any device). scheduler: a diffusers scheduler;
    it is copied, so the caller's (e.g. the training noise scheduler) is left untouched; pass
    ``DDIMScheduler.from_config(base.config)`` etc. to pick the sampler. cond: [B, L, D] text
    states, row i for seeds[i]; uncond: [1, L, D] or [B, L, D] (the unconditional branch); may
    be None only when guidance_scale == 1. added_cond / added_uncond: SDXL ``text_embeds``
    [B or 1, P] and ``time_ids`` [B or 1, 6], passed as ``added_cond_kwargs``.
    Conditional and unconditional rows go through the UNet in one batch:
    ``eps = eps_u + guidance_scale * (eps_c - eps_u)``. Returns latents on the UNet's device.
    """
    n_total = len(seeds)
    if cond.shape[0] != n_total:
        raise ValueError(f"cond: {cond.shape[0]} rows for {n_total} seeds")
    use_cfg = guidance_scale != 1.0
    if use_cfg and uncond is None:
        raise ValueError("uncond: required when guidance_scale != 1")
    if use_cfg and (added_cond is None) != (added_uncond is None):
        raise ValueError("added_uncond: give both added_cond and added_uncond, or neither")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    cond = cond.to(device, dtype)
    uncond = uncond.to(device, dtype) if uncond is not None else None
    added_cond = {k: v.to(device, dtype) for k, v in added_cond.items()} if added_cond else None
    added_uncond = {k: v.to(device, dtype) for k, v in added_uncond.items()} if added_uncond else None
    scheduler = copy.deepcopy(scheduler)
    n_chunks = (n_total + batch_size - 1) // batch_size
    bar = tqdm(total=n_chunks * num_steps, desc="sample", disable=not progress, mininterval=2)
    outputs = []
    for start in range(0, n_total, batch_size):
        rows = slice(start, min(start + batch_size, n_total))
        n = rows.stop - rows.start
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[rows]]
        hidden, added = _cfg_inputs(cond, uncond, added_cond, added_uncond, rows, n, use_cfg)
        # set_timesteps also resets the step counter and history of multistep schedulers.
        scheduler.set_timesteps(num_steps, device=device)
        x = _initial_noise(generators, latent_shape).to(device)
        outputs.append(_sample_chunk(unet, scheduler, x, hidden, added, generators, guidance_scale, use_cfg, bar))
    bar.close()
    return torch.cat(outputs)


@torch.no_grad()
def sample_conditioned(unet, noise_scheduler, cond: "Conditioning", uncond: "Conditioning", seeds: Sequence[int], *,
                       time_ids: torch.Tensor | None, latent_shape: Sequence[int], sampling: "SamplingConfig",
                       progress: bool = False) -> torch.Tensor:
    """The text-to-image sampler of generation, evaluation and SSPO: one sample per seed, float32
    [B, *latent_shape] on the UNet's device.

    It is the denoising loop of diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline
    without a negative prompt: started from ``initial_noise(seeds)`` it gives the pipeline's
    latents (tests/engine/test_sampling.py checks it on tiny models). cond: [B] rows, row i for
    seeds[i]; uncond: the model's unconditional branch (``models.unconditional_conditioning``),
    one row; time_ids: SDXL micro-conditioning [B or 1, 6], given to both branches as the
    pipelines do when no negative size is set (None for SD1.5). sampling: sampler, steps,
    guidance scale and batch size; the sampler is built from ``noise_scheduler``'s config.
    """
    added = added_u = None
    if cond.pooled is not None:
        if time_ids is None:
            raise ValueError("time_ids: required with SDXL conditioning (cond has a pooled embedding)")
        added = {"text_embeds": cond.pooled, "time_ids": time_ids}
        added_u = {"text_embeds": uncond.pooled, "time_ids": time_ids}
    return sample_latents(unet, sampling_scheduler(noise_scheduler, sampling.sampler), cond.hidden, uncond.hidden,
                          seeds, num_steps=sampling.steps, guidance_scale=sampling.guidance_scale,
                          latent_shape=latent_shape, batch_size=sampling.batch_size, added_cond=added,
                          added_uncond=added_u, progress=progress)


def latents_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Pixel-space samples in [-1, 1], [B, C, H, W] -> uint8 numpy [B, H, W, C]."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def uint8_to_latents(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [-1, 1] (pixel-space models)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
