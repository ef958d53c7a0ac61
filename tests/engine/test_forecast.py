"""Stage-time forecast (engine/forecast.py): FLOP counts, the work per stage, the report."""
import json

import pytest

from sail.engine.config import config_from_dict, load_config
from sail.engine.controller import Controller
from sail.engine.forecast import Model, forecast, stage_work, unet_forward_flops
from tests.engine.test_controller import mini_config


def _hooked_flops(arch: str, side: int, tokens: int) -> float:
    """An independent count on a real (CPU) UNet: 2 x MACs of every Conv2d and Linear from its
    output shape, and 2 matmuls of 2 B L L' d for every attention, from the shapes its hooks see."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    from sail.engine.models import _unet_config

    unet = UNet2DConditionModel(**_unet_config(arch)).eval()
    total = [0.0]

    def conv(m, inp, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += 2 * out.numel() * m.in_features

    def attention(m, args, kwargs, out):
        q = args[0] if args else kwargs["hidden_states"]
        kv = kwargs.get("encoder_hidden_states")
        kv = q if kv is None else kv
        total[0] += 2 * 2 * q.shape[0] * q.shape[1] * kv.shape[1] * m.inner_dim

    for mod in unet.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(conv)
        elif isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(linear)
        elif isinstance(mod, Attention):
            mod.register_forward_hook(attention, with_kwargs=True)
    cfg = unet.config
    kw = {"encoder_hidden_states": torch.zeros(1, tokens, cfg.cross_attention_dim)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        unet(torch.zeros(1, cfg.in_channels, side, side), torch.tensor([500]), **kw)
    return total[0]


def test_unet_flops_agree_with_an_independent_count():
    from sail.engine.models import _unet_config

    for arch, side in (("tiny-sd15", 16), ("tiny-sdxl", 16), ("tiny-sd15", 32)):
        ours = unet_forward_flops(_unet_config(arch), side, tokens=16)
        assert ours == pytest.approx(_hooked_flops(arch, side, 16), rel=1e-6)


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
