"""Stages shared by the methods: base model, pre-encoding of the seed pairs, one DPO stage.

Each function takes what it needs and the process's ``Ranks``; the controller decides the
order, the folders and the manifest records. A DPO stage builds its own training engine
(``make_strategy``) on those ranks and closes it at the end.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from sail.engine.config import RunConfig, SSPOConfig
from sail.engine.configtree import ConfigError
from sail.engine.data.cache import TrainSet
from sail.engine.data.encode import encode_pickapic
from sail.engine.layout import RunLayout
from sail.engine.compilation import compile_training
from sail.engine.models import (build_components, check_model_folder, load_components, load_unet, save_model_folder,
                                set_attention_backend)
from sail.engine.lora import LORA_DIR, add_lora, merge_lora_state, require_frozen_recompute_support, save_lora
from sail.engine.ranks import Ranks
from sail.engine.strategy import DeepSpeedStrategy, describe_strategy, make_strategy
from sail.engine.trainer import StageResult, train_dpo, write_stage_metrics

log = logging.getLogger(__name__)


def base_model_dir(cfg: RunConfig, ranks: Ranks) -> str:
    """The model folder the run starts from: ``model.path``, or ``model.arch`` built with random
    weights and saved once into the run directory (so every stage loads models from disk)."""
    if cfg.model.path:
        return str(check_model_folder(cfg.model.resolved_path()))
    folder = RunLayout.of(cfg).base_model
    if ranks.is_main and not (folder / "model_index.json").is_file():
        comps = build_components(cfg.model.arch, cfg.seed)
        save_model_folder(folder, None, dict(comps.unet.config), comps, source=None)
        # save_model_folder rebuilt the UNet from its config: write the seeded weights instead
        comps.unet.save_pretrained(folder / "unet", safe_serialization=True)
    ranks.barrier()
    return str(folder)


def encode_seed_pairs(cfg: RunConfig, ranks: Ranks, model_dir: str) -> Path:
    """Pre-encode ``data.train`` with the base model's VAE and text encoder(s) (rank-parallel)."""
    cache_dir = RunLayout.of(cfg).seed_cache
    comps = load_components(model_dir)
    for module in [comps.vae, *comps.text_encoders]:
        if module is not None:
            module.to(ranks.device)
    encode_pickapic(cfg.data, comps, cache_dir, seed=cfg.seed, ranks=ranks)
    return cache_dir


def model_save_dtype(save_precision: str, compute_dtype: torch.dtype) -> torch.dtype:
    """dtype of the UNet a training stage saves (``train.save_precision``): fp32, or the dtype
    the stage trained in."""
    return compute_dtype if save_precision == "train" else torch.float32


def run_dpo_stage(cfg: RunConfig, ranks: Ranks, init_model: str, train_set: TrainSet, out_dir: Path, *, seed: int,
                  tag: str = "dpo", reference_model: str | None = None, sspo: SSPOConfig | None = None) -> StageResult:
    """DPO from ``init_model`` against ``reference_model`` (default: the init model); writes
    ``out_dir/model`` and ``out_dir/metrics.json``. With ``sspo``: SSPO (engine/sspo.py), the
    pool starting from the init model."""
    strategy = make_strategy(cfg.train, cfg.distributed, ranks)
    comps = load_components(init_model, with_text=False, with_vae=False)
    use_lora = cfg.model.lora.rank > 0
    reference_model = reference_model or init_model
    if use_lora and reference_model != init_model:
        raise ConfigError("sail.train_reference: with LoRA the reference is the policy with its adapters off, "
                          "so it must be the model training starts from ('previous')")
    # The reference is loaded, never deep-copied; with LoRA it is the policy with adapters off.
    policy, reference = comps.unet, (None if use_lora else load_unet(reference_model))
    backend = set_attention_backend(policy, cfg.model.attention)
    if reference is not None:
        set_attention_backend(reference, cfg.model.attention)
    if use_lora:
        add_lora(policy, cfg.model.lora)
    if cfg.model.gradient_checkpointing:
        if use_lora and isinstance(strategy, DeepSpeedStrategy):
            require_frozen_recompute_support(cfg.distributed.zero_stage)
        policy.enable_gradient_checkpointing()
    unet_config = dict(policy.config)
    strategy.prepare(policy, reference, cfg.train.steps, len(train_set))
    compile_training(strategy, cfg.train.compile)
    log.info("training: %s, attention %s", describe_strategy(strategy), backend)
    t0 = time.perf_counter()
    result = train_dpo(cfg.train, strategy, comps.noise_scheduler, train_set, out_dir, seed=seed,
                       empty_prompt_prob=cfg.data.empty_prompt_prob, tag=tag, sspo=sspo, model_dir=init_model)
    state = strategy.policy_state_dict()
    if strategy.is_main:
        if use_lora:   # adapters in the diffusers format, and the merged full UNet for later stages
            save_lora(out_dir / LORA_DIR, state, policy, cfg.model.lora, comps.kind, init_model)
            state = merge_lora_state(state, cfg.model.lora)
        save_model_folder(out_dir / "model", state, unet_config, comps, source=init_model,
                          dtype=model_save_dtype(cfg.train.save_precision, strategy.compute_dtype))
        write_stage_metrics(out_dir / "metrics.json", result, {
            "seconds": time.perf_counter() - t0, "attention_backend": backend,
            "strategy": describe_strategy(strategy), "init_model": init_model,
            "reference_model": reference_model, "pairs": len(train_set),
            **({"sspo": result.sspo} if result.sspo is not None else {})})
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(out_dir / "sspo", ignore_errors=True)
    strategy.barrier()
    strategy.close()
    return result
