"""Sampling benchmark: images/s of ``engine.sampling.sample_latents`` against the diffusers
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` denoising loop on the same UNet,
scheduler, steps, guidance and batch (``output_type="latent"``: the UNet loop only, no VAE
decode; prompts pre-encoded for both, so no text encoder runs either).

    python -m sail.bench.generate                              # CPU: tiny-sd15, 8 images, 10 DDIM steps
    python -m sail.bench.generate --arch sd15 --images 64 --batch 16 --steps 50 --sampler ddpm   # SD1.5 paper setting
    python -m sail.bench.generate --arch sdxl --images 32 --batch 8 --steps 20 --sampler ddim --cfg 5   # SDXL

Both run with classifier-free guidance in one batched UNet call per step. Differences that
remain by design: our sampler seeds one generator per sample (reproducible per (prompt, seed)
under any batching), draws the noise on the CPU and moves it; the pipeline draws one batched
tensor from one generator. The last stdout line is one JSON object; rows are appended to --out
(default bench/results/generate.jsonl) with device, versions, git sha and the full config.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sail.bench.common import environment


def _components(arch: str, dtype: torch.dtype, device: torch.device):
    from sail.engine.models import build_components

    comps = build_components(arch, 0)
    comps.unet.to(device, dtype).eval()
    return comps


def _scheduler(comps, sampler: str):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    return cls.from_config(comps.noise_scheduler.config)


def _conditioning(comps, n: int, device, dtype):
    """Random text states of the right shape for n prompts and the empty prompt (the encoders'
    cost is not what is measured)."""
    g = torch.Generator().manual_seed(0)
    cfg = comps.unet.config
    tokens = comps.tokenizers[0].model_max_length
    cond = torch.randn(n, tokens, cfg.cross_attention_dim, generator=g).to(device, dtype)
    uncond = torch.randn(1, tokens, cfg.cross_attention_dim, generator=g).to(device, dtype)
    if comps.kind != "sdxl":
        return cond, uncond, None, None
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    from sail.engine.models import native_time_ids

    time_ids = native_time_ids(cfg.sample_size * comps.vae_factor, 1).to(device, dtype)
    added = {"text_embeds": torch.randn(n, pooled_dim, generator=g).to(device, dtype), "time_ids": time_ids.expand(n, 6)}
    added_u = {"text_embeds": torch.randn(1, pooled_dim, generator=g).to(device, dtype), "time_ids": time_ids}
    return cond, uncond, added, added_u


def run_ours(comps, args, device, dtype) -> float:
    from sail.engine.sampling import sample_latents

    cond, uncond, added, added_u = _conditioning(comps, args.images, device, dtype)
    side = comps.unet.config.sample_size
    return lambda: sample_latents(comps.unet, _scheduler(comps, args.sampler), cond, uncond, list(range(args.images)),
                                  num_steps=args.steps, guidance_scale=args.cfg, latent_shape=(4, side, side),
                                  batch_size=args.batch, added_cond=added, added_uncond=added_u)


def run_diffusers(comps, args, device, dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cond, uncond, added, added_u = _conditioning(comps, args.images, device, dtype)
    sched = _scheduler(comps, args.sampler)
    if comps.kind == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0],
                                         text_encoder_2=comps.text_encoders[1], tokenizer=comps.tokenizers[0],
                                         tokenizer_2=comps.tokenizers[1], unet=comps.unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0], tokenizer=comps.tokenizers[0],
                                       unet=comps.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # The whole pipeline in the UNet's dtype, as a user loads it (torch_dtype=...): the pipeline
    # casts the given embeddings to its text encoder's dtype and starts its latents in that dtype.
    pipe.to(device, dtype)
    side = comps.unet.config.sample_size * comps.vae_factor

    def sample():
        for start in range(0, args.images, args.batch):
            rows = slice(start, min(start + args.batch, args.images))
            n = rows.stop - rows.start
            kwargs = dict(prompt_embeds=cond[rows], negative_prompt_embeds=uncond.expand(n, *uncond.shape[1:]),
                          num_inference_steps=args.steps, guidance_scale=args.cfg, height=side, width=side,
                          output_type="latent", generator=torch.Generator().manual_seed(start))
            if added is not None:
                kwargs.update(pooled_prompt_embeds=added["text_embeds"][rows],
                              negative_pooled_prompt_embeds=added_u["text_embeds"].expand(n, -1))
            pipe(**kwargs)
    return sample


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, choices=["tiny-sd15", "tiny-sdxl", "sd15", "sdxl"],
                        help="default: tiny-sd15 on CPU, sd15 on GPU")
    parser.add_argument("--images", type=int, default=None, help="images per timed call (default 8 CPU, 64 GPU)")
    parser.add_argument("--batch", type=int, default=None, help="images per UNet batch (x2 with CFG)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 10 CPU, 50 GPU)")
    parser.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU, see train_step)")
    parser.add_argument("--out", default="bench/results/generate.jsonl")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.threads or not on_gpu:
        torch.set_num_threads(args.threads or 1)
        args.threads = torch.get_num_threads()
    device = torch.device("cuda" if on_gpu else "cpu")
    args.arch = args.arch or ("sd15" if on_gpu else "tiny-sd15")
    args.images = args.images or (64 if on_gpu else 8)
    args.batch = args.batch or (16 if on_gpu else 8)
    args.steps = args.steps or (50 if on_gpu else 10)
    precision = args.precision if args.precision != "auto" else ("bf16" if on_gpu else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    comps = _components(args.arch, dtype, device)
    env = environment(device)
    results = {}
    with torch.inference_mode():
        for name, build in (("ours", run_ours), ("diffusers", run_diffusers)):
            seconds = timed(build(comps, args, device, dtype), device, args.repeats)
            results[name] = {"seconds": seconds, "images_per_s": args.images / seconds,
                             "unet_calls_per_s": args.steps * -(-args.images // args.batch) / seconds}
            print(f"{name:9s} {args.arch} {args.images} images x {args.steps} {args.sampler} steps, batch "
                  f"{args.batch}, CFG {args.cfg}: {results[name]['images_per_s']:.3f} images/s", flush=True)
    row = {"bench": "generate", "config": {**vars(args), "precision": precision}, "env": env, **results,
           "speedup_vs_diffusers": results["diffusers"]["seconds"] / results["ours"]["seconds"]}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
