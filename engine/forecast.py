"""How long each stage of each iteration will take: FLOPs of the real architectures, divided
by what the GPUs deliver (docs/cluster.md, Stage-time forecast).

Work per stage, in UNet image-forwards F (one forward of one image at the training size; a
backward counts 2 F, gradient checkpointing recomputes 1 F):

    encode      seed pairs x 2 images through the VAE encoder (its own FLOPs; text encoders ignored)
    train       steps x global batch pairs x 2 images x (policy fwd + bwd 3 F + reference fwd 1 F [+ 1 F])
    generate    pool prompts x N x sampler steps x (2 with classifier-free guidance) F
    rank        pool prompts x N x K draws x 2 models F (adaptive K: at most K)

FLOPs come from the UNet and VAE configs traced on PyTorch's meta device (``FlopCounterMode``:
shapes only, no weights, no compute). Seconds = FLOPs / (GPUs x peak x MFU). The peak is the
device's dense tensor-core FLOP/s (a table; on a CPU, a measured fp32 matmul) and MFU the
fraction of it the stage reaches: 0.40 unless measured (``bench/train_step.py`` measures the
training step's). Communication is not in the forecast (bench/SCALING.md models it for
training; generation and ranking have none). The run's report puts the measured stage times
beside it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense peak FLOP/s (no sparsity) by device-name substring and precision.
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},   # fp32 = TF32 tensor cores
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},        # H100 80GB HBM3 reports no form factor
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}
ASSUMED_MFU = 0.40
TOKENS = 77


def measured_matmul_peak(device: torch.device, n: int = 1024, repeats: int = 10) -> float:
    """Best-of-repeats FLOP/s of an fp32 [n, n] @ [n, n] matmul on this device."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """The device's dense peak FLOP/s and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_TFLOPS.items():
            if key in name:
                return table[precision] * 1e12, f"table: {key} dense {precision}"
        return measured_matmul_peak(device, 8192), "measured: fp32 matmul 8192 (device not in the table)"
    return measured_matmul_peak(device), f"measured: fp32 matmul 1024, {torch.get_num_threads()} thread(s)"


def unet_forward_flops(unet_config: dict, latent_side: int, tokens: int = TOKENS) -> float:
    """FLOPs of one UNet forward of one image (meta device)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        kw = {"encoder_hidden_states": torch.empty(1, tokens, unet.config.cross_attention_dim)}
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled), "time_ids": torch.empty(1, 6)}
        x = torch.empty(1, unet.config.in_channels, latent_side, latent_side)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor([500]), **kw)
    return float(counter.get_total_flops())


def vae_encode_flops(vae_config: dict, resolution: int) -> float:
    """FLOPs of encoding one image with the VAE (meta device)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
        with FlopCounterMode(display=False) as counter:
            vae.encode(torch.empty(1, 3, resolution, resolution))
    return float(counter.get_total_flops())


@dataclass
class Model:
    """What the forecast needs of a model: its configs and sizes."""

    unet_config: dict
    vae_config: dict | None
    resolution: int
    vae_factor: int = 8

    @classmethod
    def of(cls, cfg, arch: str | None = None) -> "Model":
        """From ``model.path``'s config files (no weights read), else the built-in ``arch``."""
        from sail.engine.models import _unet_config, _vae_config

        folder = cfg.model.resolved_path() if cfg.model.path else None
        if folder is not None and Path(folder, "unet", "config.json").is_file():
            unet = json.loads(Path(folder, "unet", "config.json").read_text())
            vae_path = Path(folder, "vae", "config.json")
            vae = json.loads(vae_path.read_text()) if vae_path.is_file() else None
        else:
            arch = arch or cfg.model.arch
            if arch is None:
                raise ValueError("forecast: model.path has no unet/config.json here; name the architecture (--arch)")
            unet, vae = _unet_config(arch), _vae_config(arch)
        factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 8
        resolution = cfg.data.resolution or unet["sample_size"] * factor
        return cls(unet, vae, resolution, factor)


def stage_work(cfg, model: Model, gpus: int, pools: list[int], seed_pairs: int | None) -> list[dict]:
    """FLOPs of every stage of the run (``pools``: prompts per iteration; ``seed_pairs`` None:
    the encode stage is not forecast)."""
    from sail.engine.controller import iteration_train_config

    fwd = unet_forward_flops(model.unet_config, model.resolution // model.vae_factor)
    t = cfg.train
    per_image_train = (5 if cfg.model.gradient_checkpointing else 4) * fwd

    def train_flops(steps: int) -> float:
        batch = cfg.distributed.global_batch_pairs or t.micro_batch_pairs * t.grad_accum * gpus
        return steps * batch * 2 * per_image_train

    rows = []
    if seed_pairs is not None and model.vae_config is not None:
        rows.append({"iteration": 0, "stage": "encode", "flops": seed_pairs * 2 * vae_encode_flops(model.vae_config,
                                                                                                    model.resolution)})
    rows.append({"iteration": 0, "stage": "train", "flops": train_flops(t.steps)})
    if cfg.method in ("sail", "online_dpo"):
        s, steps = cfg.sail, iteration_train_config(cfg).steps
        cfg_passes = 2 if s.sampling.guidance_scale != 1.0 else 1
        for i, n_prompts in enumerate(pools[:s.iterations], start=1):
            images = n_prompts * s.candidates
            rows.append({"iteration": i, "stage": "generate", "flops": images * s.sampling.steps * cfg_passes * fwd})
            if cfg.method == "sail":
                rows.append({"iteration": i, "stage": "rank", "flops": images * s.rank_draws * 2 * fwd})
            rows.append({"iteration": i, "stage": "train", "flops": train_flops(steps)})
    for r in rows:
        r["unet_forward_tflop"] = fwd / 1e12
    return rows


def forecast(rows: list[dict], gpus: int, flops_per_gpu: float) -> list[dict]:
    """Seconds per stage on ``gpus`` GPUs delivering ``flops_per_gpu`` each."""
    return [dict(r, gpus=gpus, seconds=r["flops"] / (gpus * flops_per_gpu)) for r in rows]


def run_pools(cfg) -> tuple[list[int], int | None]:
    """Prompts per iteration and seed pairs, as far as the config says (the recipe's sizes, or
    the prompt files' line counts; seed pairs unknown without the recipe)."""
    settings = cfg.world_settings
    if getattr(settings, "recipe", False):
        return list(settings.pool_sizes), settings.seed_pairs
    from sail.engine.sail import read_prompt_file

    return [len(read_prompt_file(f, "sail.prompt_files")) for f in cfg.sail.prompt_files], None


def inference_weights(arch: str, bytes_per_param: int = 2) -> dict:
    """Bytes of weights a rank holds in the generate stage (UNet + text encoders; the VAE is not
    loaded: candidates stay latents) and in the rank stage (the current UNet + the ranking
    reference), for a built-in architecture; counted on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sail.engine.models import _text_configs, _unet_config

    with torch.device("meta"):
        unet = sum(p.numel() for p in UNet2DConditionModel(**_unet_config(arch)).parameters())
        text = sum(p.numel() for i, c in enumerate(_text_configs(arch))
                   for p in (CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(CLIPTextConfig(**c)).parameters())
    return {"unet_params": unet, "text_params": text, "generate": (unet + text) * bytes_per_param,
            "rank": 2 * unet * bytes_per_param}


def write_run_forecast(cfg, path: Path, pools: list[int], seed_pairs: int | None, world: int,
                       device: torch.device) -> list[dict]:
    """The forecast of a starting run on its own devices (``world`` of them), written to
    ``path`` (JSON) for the report to set beside the measured stage times."""
    from sail.engine.io import write_json
    from sail.engine.strategy import resolve_precision

    peak, source = peak_flops(device, resolve_precision(cfg.train.precision, device))
    rows = forecast(stage_work(cfg, Model.of(cfg), world, pools, seed_pairs), world, peak * ASSUMED_MFU)
    write_json(path, {"peak_flops": peak, "peak_source": source, "mfu": ASSUMED_MFU, "rows": rows})
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| iteration | stage | TFLOP | GPUs | forecast |", "|---|---|---|---|---|"]
    total = 0.0
    for r in rows:
        total += r["seconds"]
        lines.append(f"| {r['iteration']} | {r['stage']} | {r['flops'] / 1e12:,.0f} | {r['gpus']} | "
                     f"{_duration(r['seconds'])} |")
    lines.append(f"| all | | | | {_duration(total)} |")
    return "\n".join(lines)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
