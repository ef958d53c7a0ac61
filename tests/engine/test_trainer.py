import pytest
import torch
from safetensors.torch import load_file

from sail.engine import hooks
from sail.engine.config import config_from_dict
from tests.datagen import pickapic_rows, run_dpo, write_pickapic


def tiny_cfg(tmp_path, data, name, arch="tiny-sd15", **train):
    train = {"steps": 4, "micro_batch_pairs": 2, "grad_accum": 2, "log_every": 1, "optimizer": {"lr": 1e-3},
             "beta": 500.0, **train}
    return config_from_dict({"name": name, "run_dir": str(tmp_path / name), "seed": 3, "model": {"arch": arch},
                             "data": {"train": [data], "resolution": 16},
                             "train": train, "distributed": {"backend": "local"}})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    return write_pickapic(path, pickapic_rows(10))


def _unet_weights(model_dir):
    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_resume_after_stop_gives_the_same_weights(tmp_path, data):
    full = run_dpo(tiny_cfg(tmp_path, data, "full", scheduler={"name": "cosine", "warmup_steps": 2}))
    cfg = tiny_cfg(tmp_path, data, "resumed", scheduler={"name": "cosine", "warmup_steps": 2}, save_every=2)

    def stop_after_step_2(point, info):
        if point == "train" and info["step"] == 2:
            raise hooks.StopRun

    with pytest.raises(hooks.StopRun), hooks.installed(stop_after_step_2):
        run_dpo(cfg)
    assert not (tmp_path / "resumed" / "iter_000" / "model").exists()
    assert (tmp_path / "resumed" / "iter_000" / "checkpoints" / "step_2" / "optimizer.safetensors").is_file()
    resumed = run_dpo(cfg)
    a, b = _unet_weights(full), _unet_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    base = load_file(str(tmp_path / "full" / "base_model" / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    assert moved > 1e-4                                          # training really changed the weights


def test_saved_model_loads_into_stable_diffusion_pipeline(tmp_path, data):
    from diffusers import StableDiffusionPipeline

    model_dir = run_dpo(tiny_cfg(tmp_path, data, "pipe", steps=1, grad_accum=1))
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    out = pipe("w1 w2", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert image.shape == (16, 16, 3) and float(image.std()) > 0
    trained = _unet_weights(model_dir)
    loaded = dict(pipe.unet.state_dict())
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_sdxl_tiny_trains_with_pooled_and_time_ids(tmp_path, data):
    cfg = tiny_cfg(tmp_path, data, "sdxl", arch="tiny-sdxl", steps=2, grad_accum=1)
    model_dir = run_dpo(cfg)
    import json

    metrics = json.loads((tmp_path / "sdxl" / "iter_000" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics["history"])
    assert (model_dir / "text_encoder_2").is_dir() and (model_dir / "tokenizer_2").is_dir()
