"""The entry point under `python` and under the deepspeed launcher (2 CPU ranks, ZeRO-3)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.datagen import pickapic_rows, write_pickapic

REPO = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DS_ACCELERATOR", None)   # train.py must set it by itself on a machine without CUDA
    return env


def _config(tmp_path, name, **dist):
    data = write_pickapic(tmp_path / "pairs.parquet", pickapic_rows(8))
    cfg = {"name": name, "run_dir": str(tmp_path / name), "seed": 5, "model": {"arch": "tiny-sd15"},
           "data": {"train": [data], "resolution": 16},
           "train": {"steps": 3, "micro_batch_pairs": 1, "grad_accum": 2, "log_every": 1, "beta": 500.0,
                     # Conv biases ahead of a GroupNorm have a zero gradient up to rounding noise;
                     # Adam with a tiny eps turns that noise into +-lr steps that differ between
                     # reduction orders. eps 1e-6 keeps the comparison about the real updates.
                     "optimizer": {"lr": 1e-3, "eps": 1e-6}},
           "distributed": dist}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _run(cmd, timeout=900):
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_zero3_two_ranks_match_one_process(tmp_path):
    """Same seed and data: 2 ranks x micro 1 x accum 2 under ZeRO-3 against 1 process x micro 1
    x accum 4 (local strategy): same global batches, so the same losses and final weights."""
    ds_cfg = _config(tmp_path, "zero3", backend="deepspeed", zero_stage=3)
    code, out = _run(["deepspeed", "--num_gpus", "2", "--master_port", "29533", "launch/train.py",
                      "--config", str(ds_cfg)])
    assert code == 0, out[-4000:]
    local_cfg = _config(tmp_path, "local", backend="local")
    code, out = _run([sys.executable, "launch/train.py", "--config", str(local_cfg), "--set", "train.grad_accum=4"])
    assert code == 0, out[-4000:]
    hist = {n: json.loads((tmp_path / n / "iter_000" / "metrics.json").read_text())["history"]
            for n in ("zero3", "local")}
    assert [r["step"] for r in hist["zero3"]] == [1, 2, 3]
    for a, b in zip(hist["zero3"], hist["local"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["implicit_acc"] == b["implicit_acc"]
        # a global gradient-scale error hides from AdamW's weights and the clipped update
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3, abs=1e-6)
    assert "deepspeed, zero 3" in json.loads((tmp_path / "zero3" / "iter_000" / "metrics.json").read_text())["strategy"]
    wa = load_file(str(tmp_path / "zero3" / "iter_000" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "local" / "iter_000" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_sdxl_config_with_missing_model_fails_fast_naming_the_path(tmp_path):
    start = time.monotonic()
    code, out = _run(["deepspeed", "--num_gpus", "1", "--master_port", "29534", "launch/train.py",
                      "--config", "sdxl_zero3.json", "--set", "model.path=/nonexistent/sdxl-base"], timeout=300)
    assert code != 0
    assert "model.path: model folder /nonexistent/sdxl-base does not exist" in out
    assert "huggingface.co" not in out
    print(f"failed after {time.monotonic() - start:.1f}s")


def test_python_entry_point_rejects_unknown_key(tmp_path):
    cfg = _config(tmp_path, "bad", backend="local")
    code, out = _run([sys.executable, "launch/train.py", "--config", str(cfg), "--set", "train.bogus=1"])
    assert code != 0 and "unknown key 'train.bogus'" in out
