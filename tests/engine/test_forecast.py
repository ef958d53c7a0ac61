"""Stage-time forecast (engine/forecast.py): FLOP counts, the work per stage, the report."""
import json

import pytest

from sail.engine.config import config_from_dict, load_config
from sail.engine.controller import Controller
from sail.engine.forecast import Model, forecast, stage_work, unet_forward_flops
from tests.engine.test_controller import mini_config


def test_unet_flops_agree_with_the_benchmarks_trace():
    from sail.bench.scaling import trace
    from sail.engine.models import _unet_config

    for arch, side in (("tiny-sd15", 16), ("tiny-sdxl", 16)):
        ours = unet_forward_flops(_unet_config(arch), side, tokens=16)
        assert ours == pytest.approx(trace(arch).fwd_flops, rel=1e-9)
    # doubling the latent side multiplies the convolutions' work by ~4 (attention more)
    big = unet_forward_flops(_unet_config("tiny-sd15"), 32, tokens=16)
    assert 3.9 < big / unet_forward_flops(_unet_config("tiny-sd15"), 16, tokens=16) < 6


def test_work_per_stage_is_the_documented_count_of_unet_forwards():
    cfg = load_config("sdxl_zero3.json", ["sail.iterations=1", "pickapic.pool_sizes=[100]"])
    model = Model.of(cfg, "tiny-sdxl")
    rows = {(r["iteration"], r["stage"]): r for r in stage_work(cfg, model, 8, [100], seed_pairs=50)}
    f = rows[(0, "train")]["unet_forward_tflop"] * 1e12
    s = cfg.sail
    assert rows[(0, "train")]["flops"] == pytest.approx(cfg.train.steps * 128 * 2 * 5 * f)   # checkpointing: 5 F
    assert rows[(1, "train")]["flops"] == pytest.approx(s.train_steps * 128 * 2 * 5 * f)
    assert rows[(1, "generate")]["flops"] == pytest.approx(100 * s.candidates * s.sampling.steps * 2 * f)
    assert rows[(1, "rank")]["flops"] == pytest.approx(100 * s.candidates * s.rank_draws * 2 * f)
    assert rows[(0, "encode")]["flops"] > 0
    eight, sixty_four = forecast(list(rows.values()), 8, 1e14), forecast(list(rows.values()), 64, 1e14)
    for a, b in zip(eight, sixty_four):   # compute scales with the GPU count
        assert a["seconds"] == pytest.approx(8 * b["seconds"])


def test_a_run_writes_its_forecast_and_the_report_sets_measured_times_beside_it(tmp_path, toy_model):
    data = mini_config(tmp_path, toy_model)
    data["eval"]["enabled"] = False
    Controller(config_from_dict(data)).run()
    fc = json.loads((tmp_path / "run" / "forecast.json").read_text())
    stages = [(r["iteration"], r["stage"]) for r in fc["rows"]]
    assert stages == [(0, "train"), (1, "generate"), (1, "rank"), (1, "train")]
    assert fc["peak_source"].startswith("measured: fp32 matmul") and all(r["seconds"] > 0 for r in fc["rows"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| iteration | stage | forecast s | measured s |" in report
    line = next(x for x in report.splitlines() if x.startswith("| 1 | generate |"))
    assert float(line.split("|")[4]) > 0                          # the measured time is filled in


def test_inference_weights_match_the_models_a_stage_loads(tmp_path):
    """Counted on the meta device = what load_components puts in memory in bf16 (tiny SDXL)."""
    import torch

    from sail.engine.forecast import inference_weights
    from sail.engine.models import load_components, load_unet
    from tests.engine.test_split import tiny_sdxl_folder

    folder = tiny_sdxl_folder(tmp_path / "tiny_sdxl")
    nbytes = lambda modules: sum(p.numel() * p.element_size() for m in modules for p in m.parameters())  # noqa: E731
    gen = load_components(folder, with_vae=False, dtype=torch.bfloat16)
    rank = [load_components(folder, with_text=False, with_vae=False, dtype=torch.bfloat16).unet,
            load_unet(folder, torch.bfloat16)]
    counted = inference_weights("tiny-sdxl")
    assert counted["generate"] == nbytes([gen.unet, *gen.text_encoders])
    assert counted["rank"] == nbytes(rank)
    sdxl = inference_weights("sdxl")
    assert 2.5e9 < sdxl["unet_params"] < 2.6e9 and 0.8e9 < sdxl["text_params"] < 0.83e9    # SDXL: 2.57 B, 0.82 B
