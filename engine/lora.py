"""LoRA mode (``model.lora.rank > 0``): peft adapters on the UNet's attention projections.

The DPO reference is the same UNet with its adapters switched off, so no second UNet is held in
memory (Diffusion-DPO's reference is the initial model, and LoRA's initial model is exactly the
base weights: lora_B starts at zero). At the end of a stage two artefacts are written:

    <stage>/model/unet/                          the merged full UNet (base + alpha/r * B @ A),
                                                 so later stages that load ``model/unet`` work
    <stage>/lora/pytorch_lora_weights.safetensors  the adapters alone, diffusers format, for the
                                                 stage's *init* model (not the merged one)
    <stage>/lora/lora.json                       rank, alpha, targets and the init model

Load the adapters with ``pipe.load_lora_weights(<stage>/lora)`` or
``unet.load_lora_adapter(<stage>/lora, prefix="unet")`` (recent diffusers keep
``load_attn_procs`` for Custom Diffusion files only); alpha travels in the file's metadata.

Under ZeRO-3 with gradient checkpointing the frozen base weights need DeepSpeed's support for
frozen parameters in an activation-checkpoint recompute (``require_frozen_recompute_support``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from sail.engine.config import LoRAConfig
from sail.engine.configtree import ConfigError
from sail.engine.io import write_json

LORA_DIR = "lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def _unwrap(module: nn.Module) -> nn.Module:
    """The UNet inside a DeepSpeed engine (or the module itself)."""
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def lora_alpha(cfg: LoRAConfig) -> float:
    return float(cfg.alpha) if cfg.alpha is not None else float(cfg.rank)


def peft_config(cfg: LoRAConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=lora_alpha(cfg), init_lora_weights="gaussian",
                      target_modules=list(cfg.target_modules))


def add_lora(unet: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze the UNet and add trainable adapters (lora_B = 0: the output is unchanged)."""
    unet.requires_grad_(False)
    unet.add_adapter(peft_config(cfg))
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError(f"model.lora.target_modules: {cfg.target_modules} matched no module of the UNet")
    return unet


def _tuner_layers(module: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in _unwrap(module).modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """Run ``module`` as its base model for the duration.

    Sets peft's per-layer switch directly instead of ``disable_adapters()``: that one also flips
    ``requires_grad`` of the adapter weights, between the policy forward and its backward, under
    ZeRO-3 hooks that read the flag. The switch only changes which branch ``forward`` takes.
    """
    layers = _tuner_layers(module)
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield module
    finally:
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag


def reference_forward(policy: nn.Module, reference: nn.Module | None, *args, **kwargs):
    """The DPO reference prediction: the reference model, or in LoRA mode (``reference is
    None``) the policy with its adapters off. Call under ``torch.no_grad()``."""
    from sail.engine.compilation import call

    if reference is not None:
        return call(reference, *args, **kwargs)
    if not _tuner_layers(policy):
        raise RuntimeError("no DPO reference: the strategy holds none and the policy has no LoRA adapters")
    with adapters_disabled(policy):
        return call(policy, *args, **kwargs)


def merge_lora_state(state: dict, cfg: LoRAConfig) -> dict:
    """peft UNet state dict -> plain UNet state dict with ``W + alpha/r * B @ A`` merged in.

    Keys ``x.base_layer.weight`` become ``x.weight``; adapter keys are dropped. Works for
    Linear (B [o, r], A [r, i]) and Conv (B [o, r, 1, 1], A [r, i, k, k]) adapters.
    """
    scale = lora_alpha(cfg) / cfg.rank
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:      # lora_A / lora_B (and any other adapter tensor)
            continue
        merged[key.replace(".base_layer.", ".")] = value
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        prefix, rest = key.split(".lora_A.", 1)
        b = state[f"{prefix}.lora_B.{rest}"]
        weight = merged[f"{prefix}.weight"]
        delta = (b.float().flatten(1) @ a.float().flatten(1)).reshape(weight.shape)
        merged[f"{prefix}.weight"] = (weight.float() + scale * delta).to(weight.dtype)
    return merged


def save_lora(folder: Path, state: dict, unet: nn.Module, cfg: LoRAConfig, kind: str, init_model: str) -> None:
    """Write the adapters of ``state`` (the full peft UNet state) in the diffusers LoRA format,
    with the peft config (alpha) in the safetensors metadata, and ``lora.json``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(_unwrap(unet), state_dict={k: v.contiguous() for k, v in state.items()})
    layers = convert_state_dict_to_diffusers(layers)
    pipeline = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=LORA_WEIGHTS, safe_serialization=True,
                               unet_lora_adapter_metadata=peft_config(cfg).to_dict())
    write_json(folder / "lora.json", {"rank": cfg.rank, "alpha": lora_alpha(cfg),
                                      "target_modules": list(cfg.target_modules), "tensors": len(layers),
                                      "applies_to": init_model, "weights": LORA_WEIGHTS})


def require_frozen_recompute_support(zero_stage: int) -> None:
    """ZeRO-3 + non-reentrant checkpointing + frozen weights (the LoRA base) crashes with
    "recomputed shape [0]" on DeepSpeed < 0.19.3: the recompute's forward hooks re-partition a
    frozen parameter that torch's checkpoint still references (DeepSpeed PR 8148 fixed it).
    Fail at start-up with the remedy instead of in the first backward."""
    if zero_stage != 3:
        return
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    if not hasattr(coordinator, "update_recompute_parameters"):
        import deepspeed

        raise ConfigError(
            f"model.gradient_checkpointing with model.lora under ZeRO-3 needs deepspeed >= 0.19.3 (found "
            f"{deepspeed.__version__}): older versions free the frozen base weights during the checkpoint "
            "recompute. Upgrade deepspeed, use distributed.zero_stage 2, or turn checkpointing off.")


__all__ = ["add_lora", "adapters_disabled", "reference_forward", "merge_lora_state", "save_lora",
           "require_frozen_recompute_support", "LORA_DIR", "LORA_WEIGHTS"]
