import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sail.launch.pretrain_toy import main

SHIPPED = Path(__file__).resolve().parents[3] / "engine" / "toy" / "base_model"


def _load_all(folder):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tok = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return unet, text, tok, sched


def _check_folder(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == [None, None]
    assert {"unet", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    unet, text, tok, sched = _load_all(folder)
    assert unet.config.in_channels == unet.config.out_channels == 3 and unet.config.sample_size == 16
    assert text.config.hidden_size == unet.config.cross_attention_dim
    assert sched.config.prediction_type == "epsilon"
    ids = tok(["red circle on black"], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text(ids).last_hidden_state
        out = unet(torch.zeros(1, 3, 16, 16), 10, hidden).sample
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    return unet


def test_pretrain_script_few_steps(tmp_path):
    out = tmp_path / "model"
    args = ["--out", str(out), "--quiet"] + [a for kv in ("steps=4", "batch_size=8", "spec.unet_channels=[8,16,16]",
                                                       "spec.text_hidden=16", "log_every=2", "save_every=2",
                                                       "warmup_steps=2") for a in ("--set", kv)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.rindex("{\"out\""):])  # after any progress bars
    assert summary["steps"] == 4 and math.isfinite(summary["final_loss"])
    record = json.loads((out / "toy_pretrain.json").read_text())
    assert [r["step"] for r in record["losses"]] == [2, 4]
    unet = _check_folder(out)
    assert sum(p.numel() for p in unet.parameters()) == record["unet_parameters"]
    # the saved weights are the EMA, not the random initialisation
    from sail.engine.toy.model import ToyModelSpec, build_unet

    torch.manual_seed(0)
    init = build_unet(ToyModelSpec(unet_channels=(8, 16, 16), text_hidden=16))
    assert any(not torch.equal(a, b) for a, b in zip(unet.state_dict().values(), init.state_dict().values()))
    # continuing from the folder starts from its weights (same sizes, whatever --unet-channels says)
    more = tmp_path / "more"
    result = CliRunner().invoke(main, ["--out", str(more), "--set", f"init_from={out}", "--set", "steps=1",
                                       "--set", "batch_size=4", "--set", "log_every=1", "--quiet"])
    assert result.exit_code == 0, result.output
    cont = _check_folder(more)
    assert sum(p.numel() for p in cont.parameters()) == record["unet_parameters"]
    # the continuation keeps the provenance of the phase it started from
    assert json.loads((more / "toy_pretrain.json").read_text())["previous"]["losses"] == record["losses"]


def test_timestep_weights_turn_epsilon_loss_into_v_loss():
    from sail.engine.toy.model import build_scheduler
    from sail.engine.toy.pretrain import timestep_weights

    abar = build_scheduler().alphas_cumprod
    w = timestep_weights(abar, 30.0)
    assert w.shape == (1000,) and abs(float(w.mean()) - 1.0) < 1e-5
    # uncapped part: proportional to 1 / abar_t; capped at 30 x the t=0 weight's scale
    ratio = float(w[400] / w[0])
    assert ratio == pytest.approx(float(abar[0] / abar[400]), rel=1e-4) and ratio > 1.5
    assert float(w[999] / w[0]) == pytest.approx(30.0 * float(abar[0]), rel=1e-4)
    flat = timestep_weights(abar, 1.0)  # the plain epsilon loss
    assert torch.allclose(flat, torch.ones(1000))


def test_pretrain_rejects_bad_options(tmp_path):
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "m"), "--set", "spec.unet_channels=[8,12,16]"])
    assert result.exit_code == 2 and "spec.unet_channels: three multiples of 8" in result.output
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "m"), "--set", "stepz=3"])
    assert result.exit_code == 2 and "unknown key 'stepz'" in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped base model")
def test_shipped_base_model_loads():
    unet = _check_folder(SHIPPED)
    n = sum(p.numel() for p in unet.parameters())
    assert 0.5e6 < n < 2e6
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 8 * 2**20
