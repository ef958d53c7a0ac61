"""LoRA mode: the adapters-off reference equals the base model, the diffusers-format LoRA file
loads back (pipeline and UNet), the merged UNet equals base + adapters, and a whole DPO stage
in LoRA mode (one process; 2 ZeRO-3 ranks with checkpointing in the slow test)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from sail.engine.config import LoRAConfig, config_from_dict
from sail.engine.lora import (LORA_DIR, LORA_WEIGHTS, add_lora, adapters_disabled, merge_lora_state, reference_forward,
                              save_lora)
from sail.engine.models import build_components
from tests.datagen import pickapic_rows, write_pickapic
from tests.engine.test_optim import _free_port

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 16, 32, generator=g))


def _lora_unet(rank=4, alpha=8.0, perturb=True):
    """(base UNet, the same UNet with adapters whose lora_B is non-zero, config)."""
    comps = build_components("tiny-sd15", 0, with_vae=False)
    base = UNet2DConditionModel.from_config(comps.unet.config)
    base.load_state_dict(comps.unet.state_dict())
    cfg = LoRAConfig(rank=rank, alpha=alpha)
    unet = add_lora(comps.unet, cfg)
    if perturb:   # as after training: lora_B != 0
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return base.eval(), unet.eval(), cfg


def test_only_adapters_train_and_start_as_the_base_model():
    base, unet, _ = _lora_unet(perturb=False)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} >= {"to_q", "to_k", "to_v"}
    x, t, h = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, h).sample, base(x, t, h).sample, rtol=0, atol=0)


def test_reference_is_the_policy_with_adapters_disabled():
    base, unet, _ = _lora_unet()
    x, t, h = _inputs()
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    with torch.no_grad():
        base_out = base(x, t, h).sample
        policy_out = unet(x, t, h).sample
        ref_out = reference_forward(unet, None, x, t, h).sample
        after = unet(x, t, h).sample
    assert (policy_out - base_out).abs().max() > 1e-2          # the adapters do change the output
    torch.testing.assert_close(ref_out, base_out, rtol=0, atol=0)   # reference == base model, exactly
    torch.testing.assert_close(after, policy_out, rtol=0, atol=0)   # adapters back on afterwards
    assert flags == {n: p.requires_grad for n, p in unet.named_parameters()}   # requires_grad untouched
    with pytest.raises(RuntimeError, match="no DPO reference"):
        reference_forward(base, None, x, t, h)


def test_adapters_disabled_restores_on_error():
    _, unet, _ = _lora_unet()
    with pytest.raises(ValueError):
        with adapters_disabled(unet):
            raise ValueError("boom")
    assert not any(getattr(m, "_disable_adapters", False) for m in unet.modules())


def test_lora_file_loads_back_and_merged_unet_matches(tmp_path):
    """Diffusers-format file (alpha != rank, so the metadata matters) through the UNet loader and
    through StableDiffusionPipeline.load_lora_weights; merged UNet == base + adapters."""
    base, unet, cfg = _lora_unet(rank=4, alpha=8.0)
    x, t, h = _inputs()
    state = unet.state_dict()
    save_lora(tmp_path, state, unet, cfg, "sd15", "init")
    keys = load_file(str(tmp_path / LORA_WEIGHTS)).keys()
    assert keys and all(k.startswith("unet.") for k in keys)
    assert json.loads((tmp_path / "lora.json").read_text())["alpha"] == 8.0
    with torch.no_grad():
        want = unet(x, t, h).sample
        merged = UNet2DConditionModel.from_config(unet.config)
        merged.load_state_dict(merge_lora_state(state, cfg))           # strict: plain UNet keys only
        torch.testing.assert_close(merged.eval()(x, t, h).sample, want, rtol=1e-4, atol=1e-5)

        loaded = UNet2DConditionModel.from_config(unet.config)
        loaded.load_state_dict(base.state_dict())
        loaded.load_lora_adapter(str(tmp_path), weight_name=LORA_WEIGHTS, prefix="unet")
        torch.testing.assert_close(loaded.eval()(x, t, h).sample, want, rtol=0, atol=1e-6)

        comps = build_components("tiny-sd15", 0)
        pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0], tokenizer=comps.tokenizers[0],
                                       unet=base, scheduler=comps.noise_scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(tmp_path))
        torch.testing.assert_close(pipe.unet(x, t, h).sample, want, rtol=0, atol=1e-6)


def _stage_config(tmp_path: Path, **dist) -> dict:
    data = write_pickapic(tmp_path / "pairs.parquet", pickapic_rows(4))
    return {"name": "lora", "run_dir": str(tmp_path / "run"), "seed": 3,
            "model": {"arch": "tiny-sd15", "lora": {"rank": 4, "alpha": 4}, "gradient_checkpointing": True},
            "data": {"train": [data], "resolution": 16, "empty_prompt_prob": 0.0},
            "train": {"steps": 3, "micro_batch_pairs": 1, "grad_accum": 1, "log_every": 1, "beta": 500.0,
                      "optimizer": {"lr": 1e-3}},
            "distributed": dist}


def _check_stage_outputs(run_dir: Path) -> None:
    """Step 1 loss = log 2 (reference == policy at the start); merged UNet differs from the base
    only in the adapted projections; base + the LoRA file == merged UNet."""
    stage = run_dir / "iter_000"
    history = json.loads((stage / "metrics.json").read_text())["history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    base_state = load_file(str(run_dir / "base_model" / "unet" / "diffusion_pytorch_model.safetensors"))
    merged_state = load_file(str(stage / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert merged_state.keys() == base_state.keys()
    changed = {k for k in base_state if not torch.equal(base_state[k], merged_state[k])}
    assert changed and all(k.rsplit(".", 1)[0].endswith(TARGETS) and k.endswith("weight") for k in changed)
    info = json.loads((stage / LORA_DIR / "lora.json").read_text())
    assert info["rank"] == 4 and info["applies_to"] == str(run_dir / "base_model")
    x, t, h = _inputs()
    with torch.no_grad():
        merged = UNet2DConditionModel.from_pretrained(stage / "model", subfolder="unet").eval()
        loaded = UNet2DConditionModel.from_pretrained(run_dir / "base_model", subfolder="unet").eval()
        loaded.load_lora_adapter(str(stage / LORA_DIR), weight_name=LORA_WEIGHTS, prefix="unet")
        torch.testing.assert_close(loaded(x, t, h).sample, merged(x, t, h).sample, rtol=1e-4, atol=1e-5)


def test_lora_dpo_stage_one_process(tmp_path):
    from tests.datagen import run_dpo

    run_dpo(config_from_dict(_stage_config(tmp_path, backend="local")))
    _check_stage_outputs(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_lora_dpo_stage_zero3_two_ranks_with_checkpointing(tmp_path):
    """The launch path with 2 CPU ranks: frozen base partitioned by ZeRO-3, adapters trained,
    checkpoint recompute over frozen weights, state gathered for the LoRA file and the merge."""
    path = tmp_path / "lora.json"
    path.write_text(json.dumps(_stage_config(tmp_path, backend="deepspeed", zero_stage=3)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "launch/train.py",
                           "--config", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "deepspeed, zero 3" in json.loads((tmp_path / "run" / "iter_000" / "metrics.json").read_text())["strategy"]
    _check_stage_outputs(tmp_path / "run")
