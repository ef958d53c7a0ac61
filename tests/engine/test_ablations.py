"""The results-table runner: arms, forks of iteration 0, and the aggregation across seeds."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from sail.engine.ablations import ARMS, arm_config, collect, fork_iteration0, mean_se, run_arms, write_table
from sail.engine.configtree import ConfigError
from sail.engine.manifest import Manifest
from sail.engine.run import run
from tests.engine.test_controller import mini_config


def _unet(run_dir, it):
    return load_file(str(run_dir / f"iter_{it:03d}" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_arms_fork_iteration0_and_tabulate(tmp_path, toy_model, one_thread):
    base = mini_config(tmp_path, toy_model, iterations=1)
    base["eval"]["seeds_per_prompt"] = 1
    out = tmp_path / "table"
    run_arms(base, "mini.json", [3, 4], ["sail", "dpo_full", "no_mixup", "online_dpo"], out, run)
    s3, f3, n3 = (out / "seed3" / a for a in ("sail", "dpo_full", "no_mixup"))
    # the fork shares iteration 0 (same files), then trains its own iteration 1
    a, b = s3 / "iter_000" / "model" / "unet" / "diffusion_pytorch_model.safetensors", \
        n3 / "iter_000" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    assert os.path.samefile(a, b)
    assert Manifest(n3).get(0, "train")["forked_from"] == str(s3)
    assert any(not torch.equal(x, y) for x, y in zip(_unet(s3, 1).values(), _unet(n3, 1).values()))
    assert json.loads((n3 / "config.json").read_text())["sail"]["alpha"] == 1.0
    # iteration 1's candidates and rewards come from the shared iteration-0 model: linked
    assert os.path.samefile(s3 / "iter_001" / "rewards.parquet", n3 / "iter_001" / "rewards.parquet")
    shard = next((s3 / "iter_001" / "candidates").glob("*.safetensors"))
    assert os.path.samefile(shard, n3 / "iter_001" / "candidates" / shard.name)
    o3 = out / "seed3" / "online_dpo"            # same candidates, ranked by the external scorer instead
    assert os.path.samefile(shard, o3 / "iter_001" / "candidates" / shard.name)
    assert not os.path.samefile(s3 / "iter_001" / "rewards.parquet", o3 / "iter_001" / "rewards.parquet")
    # seed 4's base evaluation is seed 3's (fixed sampling seeds), its training is its own
    assert os.path.samefile(s3 / "base_eval" / "metrics.json", out / "seed4" / "sail" / "base_eval" / "metrics.json")
    assert any(not torch.equal(x, y) for x, y in zip(_unet(s3, 0).values(), _unet(out / "seed4" / "sail", 0).values()))
    # dpo_full trains on the full set, one iteration
    cfg = json.loads((f3 / "config.json").read_text())
    assert cfg["method"] == "dpo" and cfg["toy"]["preference_set"] == "full" and not (f3 / "iter_001").exists()

    table = collect(out)
    it1 = [json.loads((out / f"seed{s}" / "sail" / "iter_001" / "eval" / "metrics.json").read_text())["oracle/mean"]
           for s in (3, 4)]
    assert table["SAIL iteration 1"]["oracle/mean"] == it1
    assert table["SAIL iteration 2"]["seeds"] == []                        # one iteration only
    write_table(out)
    md = (out / "table.md").read_text()
    assert "| SAIL iteration 2 |" not in md                               # rows no seed reached: left out
    m, se, n = mean_se(it1)
    assert f"| SAIL iteration 1 | 2 | 3 | {m:.3f} ± {se:.3f} |" in md and (out / "table.png").is_file()


def test_mean_se_across_seeds():
    m, se, n = mean_se([0.30, 0.34, None, float("nan"), 0.32])
    assert (n, m) == (3, pytest.approx(0.32)) and se == pytest.approx(0.02 / math.sqrt(3))
    assert math.isnan(mean_se([0.5])[1]) and mean_se([])[2] == 0


def test_fork_refuses_a_different_iteration0(tmp_path, toy_model):
    base = mini_config(tmp_path, toy_model)
    src = arm_config(base, ARMS["sail"], 0, tmp_path, "mini.json")
    with pytest.raises(ConfigError, match="has not completed"):
        fork_iteration0(src, arm_config(base, ARMS["no_mixup"], 0, tmp_path, "mini.json"))
    other = json.loads(json.dumps(base))
    other["train"]["beta"] = 1000
    with pytest.raises(ConfigError, match="train"):
        fork_iteration0(src, arm_config(other, ARMS["no_mixup"], 0, tmp_path, "mini.json"))


def test_unknown_arm_and_non_sail_config_are_refused(tmp_path, toy_model):
    base = mini_config(tmp_path, toy_model)
    with pytest.raises(ConfigError, match="unknown"):
        run_arms(base, "mini.json", [0], ["sail", "ppo"], tmp_path, run)
    base["method"] = "dpo"
    with pytest.raises(ConfigError, match="method 'sail'"):
        run_arms(base, "mini.json", [0], ["sail"], tmp_path, run)


def test_user_variants_fork_iteration0_and_get_their_rows(tmp_path, toy_model, one_thread):
    from sail.engine.ablations import parse_variant

    base = mini_config(tmp_path, toy_model, iterations=1)
    base["eval"]["seeds_per_prompt"] = 1
    out = tmp_path / "table"
    fixed = parse_variant('fixed_ref:sail.train_reference="base";sail.lr=1e-4')
    assert fixed.overrides == ('sail.train_reference="base"', "sail.lr=1e-4") and fixed.fork
    run_arms(base, "mini.json", [5], ["sail"], out, run, (fixed,))
    v = out / "seed5" / "fixed_ref"
    assert json.loads((v / "iter_001" / "metrics.json").read_text())["reference_model"] == toy_model
    assert os.path.samefile(out / "seed5" / "sail" / "iter_000" / "model" / "unet" / "config.json",
                            v / "iter_000" / "model" / "unet" / "config.json")
    table = collect(out)
    want = json.loads((v / "iter_001" / "eval" / "metrics.json").read_text())["oracle/mean"]
    assert table["fixed_ref iteration 1"]["oracle/mean"] == [want]
    # a variant may not change what iteration 0 depends on
    with pytest.raises(ConfigError, match="train"):
        run_arms(base, "mini.json", [5], [], out, run, (parse_variant("hot:train.beta=9"),))
    for bad in ("nocolon", "sail:sail.alpha=1", "x y:sail.alpha=1", "empty:"):
        with pytest.raises(ConfigError, match="--variant"):
            parse_variant(bad)


def test_budget_arms_train_one_stage_for_the_sail_runs_total_steps(tmp_path, toy_model):
    """dpo_seed_budget and sspo get train.steps = iteration 0's + every iteration's steps."""
    base = mini_config(tmp_path, toy_model, iterations=2)      # train.steps 3, sail.train_steps 2
    for name, method in (("dpo_seed_budget", "dpo"), ("sspo", "sspo")):
        cfg = arm_config(base, ARMS[name], 4, tmp_path / "out", "test")
        assert (cfg.method, cfg.train.steps, cfg.seed) == (method, 3 + 2 * 2, 4)
        assert ARMS[name].fork is False
    assert arm_config(base, ARMS["random_pairing"], 4, tmp_path / "out", "test").train.steps == 3
    # DPO on the full label set with SAIL's total steps and the iterations' objective
    base["sail"]["loss"] = {"name": "dpo_sft", "gamma": 30}
    full = arm_config(base, ARMS["dpo_full_budget"], 4, tmp_path / "out", "test")
    assert (full.method, full.train.steps, full.world_settings.preference_set) == ("dpo", 7, "full")
    assert (full.train.loss.name, full.train.loss.gamma) == ("dpo_sft", 30)
    assert arm_config(base, ARMS["dpo_full"], 4, tmp_path / "out", "test").train.loss.name == "dpo"
    # iteration 0 with the iterations' objective: the seed set, iteration 0's steps
    it0 = arm_config(base, ARMS["dpo_seed_objective"], 4, tmp_path / "out", "test")
    assert (it0.method, it0.train.steps, it0.world_settings.preference_set) == ("dpo", 3, "seed")
    assert (it0.train.loss.name, it0.train.loss.gamma) == ("dpo_sft", 30)
    # the controls: random pairs in random order; the seed pairs only; the winner term alone
    assert arm_config(base, ARMS["self_distillation"], 4, tmp_path / "out", "test").sail.pairing == "random_unranked"
    assert arm_config(base, ARMS["seed_only"], 4, tmp_path / "out", "test").sail.alpha == 0.0
    wo = arm_config(base, ARMS["winners_only"], 4, tmp_path / "out", "test")
    assert (wo.method, wo.train.loss.name, wo.sail.loss.name, wo.sail.loss.gamma) == ("sail", "dpo", "sft", 30)
    assert all(ARMS[a].fork for a in ("self_distillation", "seed_only", "winners_only"))
    base["sail"]["loss"] = None                                 # plain DPO iterations: no winner term to keep
    with pytest.raises(ConfigError, match="winners_only arm trains the iterations' winner term alone"):
        arm_config(base, ARMS["winners_only"], 4, tmp_path / "out", "test")
