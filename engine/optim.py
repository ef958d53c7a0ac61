"""Optimizers, the learning-rate schedule and the derived DeepSpeed config.

Optimizers (``train.optimizer.name``):

- ``adamw``: torch AdamW locally; DeepSpeed's native AdamW section under DeepSpeed (fused on GPU,
  torch's on CPU, DeepSpeedCPUAdam with optimizer offload). The recipes' optimizer.
- ``adamw8bit``: bitsandbytes AdamW8bit (blockwise 8-bit moments), a client optimizer.
- ``adafactor``: transformers' Adafactor with the Diffusion-DPO SDXL settings (fixed lr: no
  relative step, no parameter scaling, no first moment).

Only an optimizer whose update is element-wise (``UPDATE_COUPLING``) may run under DeepSpeed
ZeRO 1-3, which steps it on each rank's flat partition: the others are refused there
(``check_update_exact``) and run locally or at ZeRO stage 0, where they see the parameters'
own tensors. bitsandbytes is also refused with optimizer offload (``check_offload_compatible``).
"""
from __future__ import annotations

import copy
import math

import torch

from sail.engine.config import DistributedConfig, OptimizerConfig, SchedulerConfig, TrainConfig
from sail.engine.configtree import ConfigError
from sail.engine.ranks import resolved_backend

UPDATE_COUPLING: dict[str, str | None] = {
    "adamw": None,
    "adamw8bit": "bitsandbytes quantises its moments in blocks of 256 consecutive elements, one scale a block",
    "adafactor": "it clips its update by the RMS of the whole tensor it steps and factors the second moment "
                 "over the tensor's 2-D shape",
}
"""Every ``train.optimizer.name`` -> what couples the elements of its update, or None when the
update is element-wise (each element's new value depends on that element's parameter,
gradient and state alone). Only an element-wise update is the same on a flat partition of the
parameters as on the parameters themselves, so only those optimizers run under ZeRO 1-3
(``check_update_exact``); the test ``tests/engine/test_optim.py::
test_only_elementwise_updates_survive_partitioning`` shows the difference on CPU."""


def lr_factor(step: int, cfg: SchedulerConfig, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps`` (step 0 already gets 1/warmup), then constant or cosine to zero."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return 1.0


def build_lr_scheduler(optimizer, cfg: SchedulerConfig, total_steps: int):
    """The same LambdaLR on both strategies (DeepSpeed receives it as a client scheduler), so a
    local run and a DeepSpeed run follow the same lr at every step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))


def build_optimizer(params, cfg: OptimizerConfig):
    """A client optimizer instance (used by the local strategy, and by DeepSpeed for the
    optimizers it has no native section for)."""
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("train.optimizer.name: adamw8bit needs bitsandbytes "
                              "(pip install 'bitsandbytes>=0.45', or the bnb extra of this package)") from err
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        # SDXL recipe: a fixed lr, no relative step, no parameter scaling.
        return Adafactor(params, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    raise ConfigError(f"train.optimizer.name: unknown optimizer {cfg.name!r}")


def check_batch_arithmetic(train: TrainConfig, dist: DistributedConfig, world_size: int,
                           num_pairs: int | None = None) -> int:
    """Global pairs per optimizer step; a clear error when it does not add up."""
    global_batch = train.micro_batch_pairs * train.grad_accum * world_size
    if dist.global_batch_pairs is not None and dist.global_batch_pairs != global_batch:
        per_rank = dist.global_batch_pairs / world_size
        hint = ("it does not divide by the world size" if dist.global_batch_pairs % world_size
                else f"with {world_size} ranks use micro_batch_pairs x grad_accum = {int(per_rank)}")
        raise ConfigError(
            f"distributed.global_batch_pairs = {dist.global_batch_pairs} but train.micro_batch_pairs "
            f"({train.micro_batch_pairs}) x train.grad_accum ({train.grad_accum}) x world size ({world_size}) "
            f"= {global_batch}: {hint}")
    if num_pairs is not None and num_pairs < global_batch:
        raise ConfigError(f"the training set has {num_pairs} pairs, fewer than one global batch "
                          f"({global_batch} = micro_batch_pairs x grad_accum x world size)")
    return global_batch


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(train: TrainConfig, dist: DistributedConfig, world_size: int, precision: str,
                     on_cpu: bool) -> dict:
    """The DeepSpeed config derived from ours; batch sizes count pairs. The lr schedule is
    not in it: both strategies share one LambdaLR (see ``build_lr_scheduler``)."""
    global_batch = check_batch_arithmetic(train, dist, world_size)
    opt = train.optimizer
    zero = {"stage": dist.zero_stage}
    if dist.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, contiguous_gradients=True,
                    overlap_comm=not on_cpu)
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    cfg = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch_pairs,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.clip_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if opt.name == "adamw":
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay,
            # torch's AdamW on CPU (no fused CUDA kernels to build); DeepSpeed's fused Adam on GPU.
            "torch_adam": on_cpu, "adam_w_mode": True}}
    elif dist.offload_optimizer:
        # A client optimizer (bitsandbytes, transformers) with an offload section: DeepSpeed
        # refuses any optimizer but its CPU Adam there otherwise. No zero_allow_untested_optimizer:
        # check_update_exact keeps client optimizers out of ZeRO 1-3, and DeepSpeed's own refusal
        # of an untested optimizer under ZeRO stays as a second guard.
        cfg["zero_force_ds_cpu_optimizer"] = False
    cfg = _merge(cfg, dist.deepspeed)
    check_offload_compatible(opt, cfg)
    if resolved_backend(dist) == "deepspeed":    # run.preflight also derives this config for local runs
        check_update_exact(opt, cfg)
    return cfg


def offloads_optimizer(ds_cfg: dict) -> bool:
    """True when a DeepSpeed config moves optimizer states off the GPU (cpu or nvme)."""
    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def check_offload_compatible(opt: OptimizerConfig, ds_cfg: dict) -> None:
    """Refuse a bitsandbytes optimizer with optimizer offload, however the offload was asked for
    (``distributed.offload_optimizer`` or the ``distributed.deepspeed`` passthrough)."""
    if opt.name == "adamw8bit" and offloads_optimizer(ds_cfg):
        raise ConfigError(
            "train.optimizer.name: adamw8bit (bitsandbytes) cannot be combined with optimizer offload "
            "(distributed.offload_optimizer or zero_optimization.offload_optimizer in distributed.deepspeed): "
            "bitsandbytes keeps its 8-bit states and kernels on the parameters' device, while ZeRO-Offload "
            "steps the optimizer on the CPU. Use adamw (with or without offload).")


def check_update_exact(opt: OptimizerConfig, ds_cfg: dict) -> None:
    """Refuse an optimizer whose update is not element-wise (``UPDATE_COUPLING``) wherever
    DeepSpeed hands it flat partitions instead of the parameters: ZeRO stage >= 1, at any
    precision and any world size (one rank included), read from the derived config so that the
    ``distributed.deepspeed`` passthrough counts.

    What DeepSpeed 0.19 steps (``runtime/engine.py::DeepSpeedEngine._do_optimizer_sanity_check``
    picks the wrapper in ``_configure_optimizer``):
    - stage 1-2: ``zero/stage_1_and_2.py::DeepSpeedZeroOptimizer`` sets each param group to
      ``[single_partition_of_fp32_groups[i]]``, the rank's slice of the flattened group (bf16 with
      fp32 gradient accumulation at stage 1: ``bf16_optimizer.py::BF16_Optimizer``, the same with
      ``fp32_groups_flat_partition``);
    - stage 3: ``zero/stage3.py::DeepSpeedZeroOptimizer_Stage3`` steps ``fp32_partitioned_groups_flat``;
    - stage 0: fp32 steps the module's parameters; bf16 / fp16 go to ``_configure_fp16_optimizer``,
      whose ``fp16/unfused_optimizer.py::FP16_UnfusedOptimizer`` (any optimizer but FusedAdam)
      keeps one fp32 copy per parameter, shape kept. BF16_Optimizer at stage 0 only serves
      pipeline parallelism, which this engine does not use (before DeepSpeed PR #7515, Aug 2025,
      bf16 at stage 0 went there; setup.py requires deepspeed >= 0.19.3).
    """
    stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
    coupling = UPDATE_COUPLING[opt.name]
    if coupling is None or stage == 0:
        return
    raise ConfigError(
        f"train.optimizer.name: {opt.name} cannot run under DeepSpeed ZeRO-{stage} (any precision): ZeRO steps the "
        f"optimizer on each rank's flat fp32 partition of the parameters, and {opt.name}'s update is not "
        f"element-wise ({coupling}), so it would change with where the partitions start, i.e. with the world "
        f"size. Use adamw (element-wise, exact under any partition), or {opt.name} with "
        f"distributed.zero_stage 0 or the local backend.")


# The zero_optimization keys that say how parameters (not gradients or optimizer states) are
# partitioned, fetched and kept: the partitioned reference takes the policy's (a passthrough
# stage3_param_persistence_threshold or offload_param included).
REFERENCE_ZERO_KEYS = ("stage", "offload_param", "overlap_comm", "stage3_param_persistence_threshold",
                       "stage3_model_persistence_threshold", "stage3_max_live_parameters",
                       "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
                       "stage3_module_granularity_threshold", "stage3_use_all_reduce_for_fetch_params",
                       "stage3_allgather_sequential", "zero_quantized_weights", "zero_hpz_partition_size")


def reference_deepspeed_config(policy_cfg: dict) -> dict:
    """Config of the optimizer-less reference engine (``distributed.reference: partitioned``):
    partitioned and fetched like the policy (``REFERENCE_ZERO_KEYS``), without optimizer."""
    keep = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16",
            "steps_per_print", "wall_clock_breakdown")
    cfg = {k: copy.deepcopy(policy_cfg[k]) for k in keep if k in policy_cfg}
    zero = policy_cfg["zero_optimization"]
    cfg["zero_optimization"] = {k: copy.deepcopy(zero[k]) for k in REFERENCE_ZERO_KEYS if k in zero}
    return cfg
