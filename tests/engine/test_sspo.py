"""SSPO (engine/sspo.py): the replay pool, the reduction to Diffusion-DPO with self-generated
losers, resume after SIGKILL mid-stage, 2 ranks (ZeRO-3) = 1 process."""
import json
import shutil
import signal
import sys
from collections import Counter

import pytest
import torch
from sail.engine import seeds
from sail.engine.config import config_from_dict
from sail.engine.controller import Controller
from sail.engine.data.cache import PairCache, TrainSet
from sail.engine.models import load_components, load_unet
from sail.engine.sampling import sample_latents, sampling_scheduler
from sail.engine.sspo import pool_members, replay_checkpoint
from sail.engine.strategy import LocalStrategy
from sail.engine.trainer import train_dpo
from tests.engine.test_controller import _launch, _weights, mini_config


def sspo_config(root, model, steps=6, **sspo) -> dict:
    data = mini_config(root, model)
    data["method"] = "sspo"
    data["train"]["steps"] = steps
    data["sspo"] = {"checkpoint_every": 2, "pool_size": 2, **sspo}
    data["eval"]["enabled"] = False
    return data


def test_pool_is_the_newest_checkpoints_and_draws_are_uniform():
    assert [pool_members(s, 30, 7) for s in (0, 29, 30, 59)] == [[0], [0], [0, 30], [0, 30]]
    assert pool_members(210, 30, 7) == [30, 60, 90, 120, 150, 180, 210]        # the initial model left
    draws = Counter(replay_checkpoint(5, s, 30, 7) for s in range(210, 240))
    assert set(draws) <= set(pool_members(210, 30, 7))
    many = Counter(replay_checkpoint(5, s, 4000, 4) for s in range(12000, 16000))   # pool fixed at 4 members
    assert set(many) == {0, 4000, 8000, 12000} and min(many.values()) > 900         # ~1000 each
    assert [replay_checkpoint(5, s, 30, 7) for s in range(300)] == [replay_checkpoint(5, s, 30, 7) for s in range(300)]


def test_sspo_stage_trains_on_winners_and_reference_samples(tmp_path, toy_model):
    cfg = config_from_dict(sspo_config(tmp_path, toy_model))
    Controller(cfg).run()
    run = tmp_path / "run"
    metrics = json.loads((run / "iter_000" / "metrics.json").read_text())
    assert metrics["sspo"]["pool"] == [2, 4]                       # newest 2 of {0, 2, 4} at the last step
    assert metrics["sspo"]["switch"] is True
    # at most one sample per (checkpoint, row), at most one per (step, position): 6 steps x 2
    assert 0 < metrics["sspo"]["reference_samples"] <= 12
    assert all(0.0 <= row["winner_worse"] <= 1.0 for row in metrics["history"])
    assert not (run / "iter_000" / "sspo").exists()               # pool and samples removed when done
    base, trained = load_unet(toy_model).state_dict(), _weights(run, 0)
    assert max((trained[k] - base[k]).abs().max().item() for k in trained) > 1e-4
    assert "SSPO: pool of 2" in (run / "report.md").read_text()


def test_one_checkpoint_and_no_switch_is_dpo_with_self_generated_losers(tmp_path, toy_model, one_thread):
    """A pool holding only the initial model, switch off: SSPO is Diffusion-DPO whose losers are
    the initial model's own samples of the winners' prompts (sampled here independently)."""
    data = sspo_config(tmp_path, toy_model, steps=4, checkpoint_every=100, pool_size=1, switch=False)
    cfg = config_from_dict(data)
    Controller(cfg).run()
    run = tmp_path / "run"
    sspo_weights = _weights(run, 0)

    cache = PairCache(run / "cache" / "seed")
    comps = load_components(toy_model, with_text=False, with_vae=False)
    s = cfg.sail.sampling
    stage_seed = seeds.stage_training(cfg.seed, 0)
    losers = {}
    for row in range(len(cache)):
        b = cache.load([row])
        losers[row] = sample_latents(comps.unet, sampling_scheduler(comps.noise_scheduler, s.sampler), b.hidden,
                                     cache.empty_hidden, [seeds.reference_sample(stage_seed, 0, row)],
                                     num_steps=s.steps, guidance_scale=s.guidance_scale,
                                     latent_shape=tuple(b.latents_w.shape[1:]), batch_size=1)[0]

    class SelfGenerated(TrainSet):
        def load(self, indices):
            batch = super().load(indices)
            batch.latents_l = torch.stack([losers[int(i)] for i in indices])
            return batch

    strategy = LocalStrategy(cfg.train, cfg.distributed)
    strategy.prepare(load_unet(toy_model), load_unet(toy_model), cfg.train.steps, len(cache))
    train_set = SelfGenerated([cache], [(0, i) for i in range(len(cache))])
    train_dpo(cfg.train, strategy, comps.noise_scheduler, train_set, tmp_path / "dpo", seed=stage_seed,
              empty_prompt_prob=cfg.data.empty_prompt_prob)
    dpo_weights = strategy.policy_state_dict()
    moved = max((sspo_weights[k] - load_unet(toy_model).state_dict()[k]).abs().max().item() for k in sspo_weights)
    assert moved > 1e-3                                               # it trained
    for key in sspo_weights:   # the samples were drawn in other batch sizes here: rounding-level slack
        torch.testing.assert_close(sspo_weights[key], dpo_weights[key], rtol=0, atol=1e-4)


def test_sigkill_mid_sspo_stage_then_resume_gives_the_same_model(tmp_path, toy_model, one_thread):
    Controller(config_from_dict(sspo_config(tmp_path / "a", toy_model))).run()
    data = sspo_config(tmp_path / "b", toy_model)
    data["toy"]["data_dir"] = str(tmp_path / "a" / "toy_data")
    cfg_path = tmp_path / "b.json"
    cfg_path.write_text(json.dumps(data))
    # mid-segment (after step 3's checkpoint), then after segment 4's samples, before its first step
    for point in ("train@3", "sspo_samples@4"):
        proc = _launch(cfg_path, point, extra=[sys.executable])
        assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.returncode}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "b" / "run" / "iter_000" / "sspo" / "pool" / "step_000004.safetensors").is_file()
    proc = _launch(cfg_path, None, extra=[sys.executable])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path / "a" / "run", 0), _weights(tmp_path / "b" / "run", 0)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_two_ranks_zero3_sspo_equals_one_process(tmp_path, toy_model):
    Controller(config_from_dict(sspo_config(tmp_path / "one", toy_model))).run()
    data = sspo_config(tmp_path / "two", toy_model)
    data["toy"]["data_dir"] = str(tmp_path / "one" / "toy_data")
    data["distributed"] = {"backend": "deepspeed", "zero_stage": 3}
    data["train"]["micro_batch_pairs"] = 1                        # the same global batch of 2 pairs
    cfg_path = tmp_path / "two.json"
    cfg_path.write_text(json.dumps(data))
    proc = _launch(cfg_path, None, extra=["deepspeed", "--num_gpus", "2", "--master_port", "29543"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    one, two = (json.loads((tmp_path / r / "run" / "iter_000" / "metrics.json").read_text()) for r in ("one", "two"))
    assert one["sspo"]["reference_samples"] == two["sspo"]["reference_samples"]
    a, b = _weights(tmp_path / "one" / "run", 0), _weights(tmp_path / "two" / "run", 0)
    for key in a:   # ZeRO-3 reduces the gradient across ranks in another order: rounding-level slack
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
