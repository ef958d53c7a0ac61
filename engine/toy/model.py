"""The toy world's text-to-image model: word-level tokenizer, tiny CLIP text encoder, tiny
pixel-space UNet (no VAE: the latents are the images in [-1, 1]) and a DDPM scheduler, saved
as a standard diffusers-format folder that the engine loads like any SD1.5-style model.

The UNet keeps few channels at full resolution (16x16) because convolutions there dominate
the cost of every sampling step, and sampling speed sets the length of the whole SAIL demo.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sail.engine.models import load_components
from sail.engine.toy.world import vocabulary

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
# eos must not be id 2: CLIPTextModel falls back to a legacy "argmax id" pooling when it is.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
MAX_TOKENS = 8  # <bos> + 4 words + <eos>, with room to spare


@dataclass
class ToyModelSpec:
    """Sizes of the toy model (plain types; recorded in the pretraining record)."""

    unet_channels: tuple[int, ...] = (16, 32, 64)
    """UNet block widths at 16x16, 8x8 and 4x4."""
    text_hidden: int = 64
    """Text encoder width (= the UNet's cross-attention dimension)."""
    text_layers: int = 2
    """Text encoder depth."""

    def __post_init__(self):
        if len(self.unet_channels) != 3 or min(self.unet_channels) < 8 or any(c % 8 for c in self.unet_channels):
            raise ValueError(f"unet_channels: three multiples of 8, got {self.unet_channels}")
        if self.text_hidden < 8 or self.text_hidden % 4:
            raise ValueError(f"text_hidden: a multiple of 4 >= 8, got {self.text_hidden}")
        if self.text_layers < 1:
            raise ValueError(f"text_layers: must be >= 1, got {self.text_layers}")


def build_tokenizer():
    """Word-level tokenizer over the world's vocabulary, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=MAX_TOKENS)


def build_text_encoder(spec: ToyModelSpec, vocab_size: int):
    """A tiny CLIPTextModel (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
                         num_hidden_layers=spec.text_layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                         projection_dim=spec.text_hidden, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID)
    return CLIPTextModel(cfg)


def build_unet(spec: ToyModelSpec, image_size: int = 16):
    """A tiny pixel-space UNet2DConditionModel (3 channels in and out, ~1M parameters)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=tuple(spec.unet_channels), norm_num_groups=8, attention_head_dim=8,
        cross_attention_dim=spec.text_hidden,
        # The prompt also reaches every ResNet block through the timestep embedding (attention-
        # pooled text states, FiLM scale/shift): colours and shape are global attributes, and
        # this path learns them several times faster than cross-attention alone. No extra
        # inputs are needed, so the UNet is called exactly like an SD1.5 one.
        addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift",
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def build_scheduler():
    """DDPM, epsilon prediction; the cosine schedule suits small pixel-space images (Nichol &
    Dhariwal 2021), and clipping keeps x0 estimates in the image range."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=True, clip_sample_range=1.0)


def model_index() -> dict:
    """model_index.json of a toy folder: an SD1.5-style pipeline whose VAE is recorded as absent."""
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "vae": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False}


def save_toy_model(out: str | os.PathLike, unet, text_encoder, tokenizer, scheduler,
                   record: dict | None = None) -> Path:
    """Write a diffusers-format folder; built in a temp folder then renamed (a folder that
    exists is complete). ``record`` goes to toy_pretrain.json (provenance)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    if record is not None:
        (tmp / "toy_pretrain.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


@dataclass
class ToyModel:
    """A loaded toy model folder (inference: everything in eval mode, no grad)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    path: Path


def load_toy_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ToyModel:
    """The four components of a toy (or any SD1.5-style, VAE-less) model folder, frozen and in
    eval mode, in ``dtype``, through the engine's one loader (``engine.models.load_components``)."""
    comps = load_components(folder, with_vae=False, dtype=dtype)
    unet = comps.unet.eval().requires_grad_(False)
    return ToyModel(unet, comps.text_encoders[0], comps.tokenizers[0], comps.noise_scheduler, Path(folder))


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as the engine's prompt encoder makes them: [B, model_max_length]."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def sample_images(model: ToyModel, prompts: list[str], seeds, sampling, progress: bool = False) -> np.ndarray:
    """One image per (prompt, seed) from a pixel-space model with ``sampling`` (a
    ``SamplingConfig``): uint8 [B, H, W, 3]. Conditioning exactly as the engine encodes prompts
    for SD1.5-style models."""
    from sail.engine.models import encode_prompts
    from sail.engine.sampling import latents_to_uint8, sample_latents, sampling_scheduler

    if len(prompts) != len(seeds):
        raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts")
    cond = encode_prompts([model.text_encoder], [model.tokenizer], list(prompts)).hidden
    uncond = encode_prompts([model.text_encoder], [model.tokenizer], [""]).hidden
    cfg = model.unet.config
    x = sample_latents(model.unet, sampling_scheduler(model.scheduler, sampling.sampler), cond, uncond, seeds,
                       num_steps=sampling.steps, guidance_scale=sampling.guidance_scale,
                       latent_shape=(cfg.in_channels, cfg.sample_size, cfg.sample_size), batch_size=sampling.batch_size,
                       progress=progress)
    return latents_to_uint8(x)
