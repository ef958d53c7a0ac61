import json

import pytest

from sail.engine.config import load_config
from sail.engine.configtree import ConfigError
from sail.engine.optim import check_batch_arithmetic, deepspeed_config


def _write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


BASE = {"name": "t", "model": {"arch": "tiny-sd15"}, "data": {"train": ["x.parquet"]}}


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, {**BASE, "train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"cfg.json: unknown key 'train.stepz'"):
        load_config(path)


def test_wrong_type_and_range_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.json: train.steps: expected an integer"):
        load_config(_write(tmp_path, {**BASE, "train": {"steps": "many"}}))
    with pytest.raises(ConfigError, match=r"cfg.json: train.optimizer.lr: must be > 0"):
        load_config(_write(tmp_path, {**BASE, "train": {"optimizer": {"lr": -1}}}))
    with pytest.raises(ConfigError, match=r"distributed.zero_stage: must be 0-3"):
        load_config(_write(tmp_path, {**BASE, "distributed": {"zero_stage": 4}}))
    with pytest.raises(ConfigError, match=r"method: must be one of"):
        load_config(_write(tmp_path, {**BASE, "method": "ppo"}))


def test_keys_that_nothing_reads_are_refused_at_load(tmp_path):
    """A config key either works or is refused: no method that is not built, SSPO not with
    settings it cannot honour, and no prediction-type override (the model folder's scheduler
    config says epsilon or v)."""
    with pytest.raises(ConfigError, match=r"method: must be one of \['dpo', 'sail', 'online_dpo', 'sspo'\], got 'kto'"):
        load_config(_write(tmp_path, {**BASE, "method": "kto"}))
    with pytest.raises(ConfigError, match=r"method: sspo replays full checkpoints as references: not with LoRA"):
        load_config(_write(tmp_path, {**BASE, "method": "sspo", "model": {"arch": "tiny-sd15", "lora": {"rank": 4}}}))
    with pytest.raises(ConfigError, match=r"train.loss: sspo's switch needs the DPO margin"):
        load_config(_write(tmp_path, {**BASE, "method": "sspo", "train": {"loss": {"name": "dpop", "lam": 1.0}}}))
    with pytest.raises(ConfigError, match=r"sspo.checkpoint_every: must be >= 1"):
        load_config(_write(tmp_path, {**BASE, "method": "sspo", "sspo": {"checkpoint_every": 0}}))
    with pytest.raises(ConfigError, match=r"unknown key 'model.prediction_type'"):
        load_config(_write(tmp_path, {**BASE, "model": {"arch": "tiny-sd15", "prediction_type": "epsilon"}}))


def test_bad_row_policy_keys(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.data.max_bad_fraction == 0.01 and cfg.data.strict is False
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction: must be in \[0, 1\), got 1.5"):
        load_config(_write(tmp_path, {**BASE, "data": {"train": ["x"], "max_bad_fraction": 1.5}}))


def test_set_overrides_parse_json_values(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["train.optimizer.lr=3e-4", "train.steps=7", "name=other",
                                               "distributed.deepspeed={\"wall_clock_breakdown\": true}"])
    assert cfg.train.optimizer.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 7 and cfg.name == "other"
    assert cfg.distributed.deepspeed == {"wall_clock_breakdown": True}


def test_config_lookup_in_cwd_then_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, {**BASE, "name": "local_one"}, "sdxl_zero3.json")
    assert load_config("sdxl_zero3.json").name == "local_one"       # working directory first
    monkeypatch.chdir(tmp_path / "..")
    assert load_config("sdxl_zero3.json").name == "sdxl_sail"       # then the repo's configs/
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config.json")


def test_batch_that_does_not_divide_is_a_clear_error(tmp_path):
    cfg = load_config(_write(tmp_path, {**BASE, "train": {"micro_batch_pairs": 2, "grad_accum": 4},
                                        "distributed": {"global_batch_pairs": 12}}))
    with pytest.raises(ConfigError, match=r"global_batch_pairs = 12 .* x world size \(1\) = 8"):
        check_batch_arithmetic(cfg.train, cfg.distributed, world_size=1)
    with pytest.raises(ConfigError, match="does not divide by the world size"):
        check_batch_arithmetic(cfg.train, cfg.distributed, world_size=5)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        check_batch_arithmetic(cfg.train, cfg.distributed.__class__(), world_size=2, num_pairs=10)


def test_deepspeed_config_is_derived_from_ours(tmp_path):
    cfg = load_config(_write(tmp_path, {**BASE, "train": {"micro_batch_pairs": 2, "grad_accum": 3,
                                                          "clip_grad_norm": 0.5, "optimizer": {"lr": 2e-5}},
                                        "distributed": {"zero_stage": 3, "deepspeed": {"zero_optimization":
                                                                                       {"reduce_bucket_size": 123}}}}))
    ds = deepspeed_config(cfg.train, cfg.distributed, world_size=4, precision="bf16", on_cpu=False)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123          # passthrough merged, stage kept
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 2e-5
    assert ds["optimizer"]["params"]["torch_adam"] is False


def test_shipped_configs_validate():
    for name in ("sdxl_zero3.json", "sdxl_dpo.json", "sd15_dpo.json", "sd15_sail.json", "tiny_sd15.json",
                 "sd15_sspo.json", "toy_sspo_cpu.json", "toy_cpu.json"):
        cfg = load_config(name)
        assert cfg.train.steps > 0
    sspo = load_config("sd15_sspo.json")
    assert (sspo.method, sspo.sspo.pool_size, sspo.sspo.checkpoint_every, sspo.train.steps) == ("sspo", 7, 30, 210)
    sdxl = load_config("sdxl_zero3.json")
    assert sdxl.distributed.zero_stage == 3 and sdxl.model.gradient_checkpointing
    # the SAIL recipes: the paper's split of data.train, its iterations, N, K, alpha, beta, samplers
    s = sdxl.sail
    assert (sdxl.method, sdxl.world_settings.seed_pairs, sdxl.world_settings.pool_sizes) == ("sail", 50000, [10000, 20000])
    assert (s.iterations, s.candidates, s.rank_draws, s.alpha, sdxl.train.beta) == (2, 8, 10, 0.25, 5000)
    assert (s.sampling.sampler, s.sampling.steps, s.sampling.guidance_scale) == ("ddim", 20, 5.0)
    sd15 = load_config("sd15_sail.json")
    assert (sd15.sail.iterations, sd15.sail.sampling.sampler, sd15.sail.sampling.steps) == (3, "ddpm", 50)
    assert sd15.world_settings.pool_sizes == [10000, 20000, 20000]


def test_sail_iterations_train_overrides():
    from sail.engine.config import config_from_dict
    from sail.engine.controller import iteration_train_config

    cfg = config_from_dict({"name": "x", "train": {"beta": 2000, "steps": 300, "optimizer": {"lr": 3e-5}},
                            "sail": {"train_steps": 150, "lr": 1e-5}})
    t = iteration_train_config(cfg)
    assert (t.steps, t.optimizer.lr, t.beta) == (150, 1e-5, 2000)           # beta: train's
    assert cfg.train.optimizer.lr == 3e-5 and cfg.train.steps == 300        # iteration 0 untouched
    with pytest.raises(ConfigError, match="lr"):
        config_from_dict({"name": "x", "sail": {"lr": 0}})


def test_train_reference_other_than_previous_needs_full_weights():
    from sail.engine.config import config_from_dict

    assert config_from_dict({"name": "x", "sail": {"train_reference": "base"}}).sail.train_reference == "base"
    with pytest.raises(ConfigError, match="train_reference"):
        config_from_dict({"name": "x", "model": {"arch": "tiny-sd15", "lora": {"rank": 4}},
                          "sail": {"train_reference": "anchor"}})


def test_loss_options_are_checked_and_the_iterations_can_override_the_objective(tmp_path):
    from sail.engine.controller import iteration_train_config

    with pytest.raises(ConfigError, match=r"train\.loss\.gamma: only with name dpo_sft or sft"):
        load_config(_write(tmp_path, {**BASE, "train": {"loss": {"gamma": 300}}}))
    with pytest.raises(ConfigError, match=r"train\.loss\.lam: dpop needs lam > 0"):
        load_config(_write(tmp_path, {**BASE, "train": {"loss": {"name": "dpop"}}}))
    cfg = load_config(_write(tmp_path, {**BASE, "sail": {"loss": {"name": "dpo_sft", "gamma": 300}}}))
    assert cfg.train.loss.name == "dpo" and cfg.train.loss.kernel_weights() == {"sft_weight": 0.0, "hinge_weight": 0.0,
                                                                                "dpo_term": True}
    it = iteration_train_config(cfg)
    assert it.loss.name == "dpo_sft" and it.loss.kernel_weights() == {"sft_weight": 300.0, "hinge_weight": 0.0,
                                                                      "dpo_term": True}
    winners_only = load_config(_write(tmp_path, {**BASE, "train": {"loss": {"name": "sft", "gamma": 300}}}))
    assert winners_only.train.loss.kernel_weights() == {"sft_weight": 300.0, "hinge_weight": 0.0, "dpo_term": False}
    with pytest.raises(ConfigError, match=r"train\.loss\.gamma: sft needs gamma > 0"):
        load_config(_write(tmp_path, {**BASE, "train": {"loss": {"name": "sft"}}}))
