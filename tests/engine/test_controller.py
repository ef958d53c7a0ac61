"""The SAIL loop on a tiny toy world: resume after SIGKILL in every stage, 2 ranks = 1 process."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from sail.engine.config import config_from_dict
from sail.engine.controller import Controller, make_plan
from sail.engine.configtree import ConfigError
from sail.engine.ranks import single_process
from sail.engine.worlds import make_world

REPO = Path(__file__).resolve().parents[2]

WORLD = {"num_seed_prompts": 6, "images_per_seed_prompt": 4, "seed_pairs_per_prompt": 2, "full_multiplier": 2,
         "pool_prompts": 4, "num_eval_prompts": 3, "eval_seeds_per_prompt": 2,
         "num_iterations": 2, "sampling": {"steps": 3, "guidance_scale": 1.5, "batch_size": 64}}


def mini_config(root: Path, model: str, iterations: int = 1, **sail) -> dict:
    return {"name": "mini", "method": "sail", "seed": 1, "run_dir": str(root / "run"),
            "model": {"path": model}, "data": {"empty_prompt_prob": 0.1, "random_flip": False},
            "world": "toy", "toy": {"data_dir": str(root / "toy_data"), "world": WORLD},
            "train": {"beta": 500, "steps": 3, "micro_batch_pairs": 2, "log_every": 1, "save_every": 1,
                      "optimizer": {"lr": 1e-3, "eps": 1e-6}},
            "distributed": {"backend": "local"},
            "sail": {"iterations": iterations, "candidates": 3, "rank_draws": 2,
                     "sampling": {"steps": 3, "batch_size": 3}, "rank_batch_size": 6, "train_steps": 2, **sail},
            "eval": {"enabled": True, "seeds_per_prompt": 2}}


def _weights(run: Path, it: int) -> dict:
    return load_file(str(run / f"iter_{it:03d}" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def _launch(cfg_path: Path, kill_at: str | None, extra=()):
    """launch/train.py, through tests/kill_at.py when it must die at ``kill_at``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    script = ["tests/kill_at.py", kill_at, "launch/train.py"] if kill_at else ["launch/train.py"]
    return subprocess.run([*extra, *script, "--config", str(cfg_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_sigkill_in_each_stage_then_resume_gives_the_same_model(tmp_path, toy_model):
    """Killed in every stage (mid-stage where a stage has steps or chunks), each resume continues
    where the last one stopped, not from the stage's start, and ends on the uninterrupted run's
    pairs and weights."""
    reference = config_from_dict(mini_config(tmp_path / "a", toy_model, chunk_prompts=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the same thread count as the resumed subprocesses below
    try:
        Controller(reference).run()
    finally:
        torch.set_num_threads(threads)
    stages = json.loads((tmp_path / "a" / "run" / "manifest.json").read_text())["stages"]
    assert list(stages) == ["iter_-01/evaluate", "iter_000/encode", "iter_000/train", "iter_000/evaluate",
                            "iter_001/generate", "iter_001/rank", "iter_001/pair", "iter_001/mix",
                            "iter_001/train", "iter_001/evaluate"]
    cfg_path = tmp_path / "b.json"
    data = mini_config(tmp_path / "b", toy_model, chunk_prompts=1)
    data["toy"]["data_dir"] = str(tmp_path / "a" / "toy_data")          # same data, built once
    cfg_path.write_text(json.dumps(data))
    # each killed process resumes the previous one and dies at the next stage's kill point:
    # train after its step-2 checkpoint, generate and rank with 2 and 1 of 4 chunks written
    logs = {}
    for point in ("evaluate", "train@2", "generate@2", "rank@1", "pair", "mix"):
        proc = _launch(cfg_path, point, extra=[sys.executable])
        assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.returncode}\n{proc.stderr[-3000:]}"
        logs[point] = proc.stderr
    proc = _launch(cfg_path, None, extra=[sys.executable])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter0: resumed from the checkpoint of step 2 of 3" in logs["generate@2"]
    assert "generate: resuming, 2 of 4 chunks already done, 2 to do" in logs["rank@1"]
    assert "rank: resuming, 1 of 4 chunks already done, 3 to do" in logs["pair"]
    run_b = tmp_path / "b" / "run"
    assert json.loads((run_b / "iter_000" / "metrics.json").read_text())["resumed_from_step"] == 2
    assert json.loads((run_b / "iter_001" / "metrics.json").read_text())["resumed_from_step"] == 0
    run_a, run_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    a, b = _weights(run_a, 1), _weights(run_b, 1)
    base = load_file(str(Path(toy_model) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3      # the loop did train
    for key in a:   # in-process vs subprocess: rounding-level slack only
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-5)
    pa_, pb_ = (pq.read_table(r / "iter_001" / "pairs.parquet").to_pydict() for r in (run_a, run_b))
    assert (pa_["winner"], pa_["loser"]) == (pb_["winner"], pb_["loser"])
    torch.testing.assert_close(torch.tensor(pa_["margin"]), torch.tensor(pb_["margin"]), rtol=1e-3, atol=1e-4)
    report = (run_b / "report.md").read_text()
    assert "| iter_001 |" in report and (run_b / "metrics.png").is_file()
    assert (run_b / "iter_001" / "eval" / "samples.png").is_file()


def test_pairs_stay_latents_and_mix_proportion(tmp_path, toy_model):
    run = tmp_path / "run"
    cfg = config_from_dict(mini_config(tmp_path, toy_model, alpha=0.25))
    Controller(cfg).run()
    from sail.engine.data.cache import PairCache, TrainSet
    from sail.engine.sail import Candidates

    pairs = pq.read_table(run / "iter_001" / "pairs.parquet").to_pydict()
    rewards = pq.read_table(run / "iter_001" / "rewards.parquet").to_pydict()
    assert len(rewards["draws"][0]) == 2                                # K per-draw values kept
    cands = Candidates(run / "iter_001" / "candidates")
    gen = PairCache(run / "iter_001" / "pairs_cache")
    for row, (p, w, l) in enumerate(zip(pairs["prompt_idx"], pairs["winner"], pairs["loser"])):
        rs = [r for q, r in zip(rewards["prompt_idx"], rewards["reward"]) if q == p]
        assert rs[w] == max(rs) and rs[l] == min(rs)                      # best vs worst
        latents = cands.of_prompt(p)[0]
        assert torch.equal(gen.load([row]).latents_w[0], latents[w])     # the generated latents, untouched
    ts = TrainSet.read(run / "iter_001" / "train_set.parquet")
    generated = sum(1 for c, _ in ts.entries if ts.caches[c].dir.name == "pairs_cache")
    assert generated == 4 and len(ts) == 16                               # alpha 0.25: 4 generated + 12 seed


def test_overlapping_pools_are_refused(tmp_path, toy_model):
    shared = tmp_path / "pool.txt"
    shared.write_text("red circle on black\nblue square on white\n")
    data = mini_config(tmp_path, toy_model, iterations=2, prompt_files=[str(shared), str(shared)])
    data["world"] = "pickapic"
    del data["toy"]
    data["data"]["train"] = ["unused.parquet"]
    cfg = config_from_dict(data)
    with pytest.raises(ConfigError, match="'pool_1' and 'pool_2' share 2 prompt"):
        make_plan(cfg, make_world(cfg), single_process())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_two_ranks_generate_disjoint_complete_shards_and_the_same_pairs(tmp_path, toy_model):
    one = config_from_dict(mini_config(tmp_path / "one", toy_model, chunk_prompts=1))
    Controller(one).run()
    data = mini_config(tmp_path / "two", toy_model, chunk_prompts=1)
    data["toy"]["data_dir"] = str(tmp_path / "one" / "toy_data")
    data["distributed"] = {"backend": "deepspeed", "zero_stage": 3}
    data["train"]["micro_batch_pairs"] = 1
    data["eval"]["enabled"] = False
    cfg_path = tmp_path / "two.json"
    cfg_path.write_text(json.dumps(data))
    proc = _launch(cfg_path, None, extra=["deepspeed", "--num_gpus", "2", "--master_port", "29541"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    cand = tmp_path / "two" / "run" / "iter_001" / "candidates"
    ids = [load_file(str(f))["prompt_ids"].tolist() for f in sorted(cand.glob("prompts_*.safetensors"))]
    assert sorted(sum(ids, [])) == [0, 1, 2, 3]                    # every prompt in exactly one chunk
    from sail.engine.sail import Candidates

    single, two = (Candidates(tmp_path / n / "run" / "iter_001" / "candidates") for n in ("one", "two"))
    for p in range(4):   # same per-prompt batches (3 candidates); other thread counts
        torch.testing.assert_close(two.of_prompt(p)[0], single.of_prompt(p)[0], rtol=1e-2, atol=1e-3)
    from tests.launch.test_world_size import _separated_pairs

    pa, pb = (pq.read_table(tmp_path / n / "run" / "iter_001" / "pairs.parquet").to_pydict() for n in ("one", "two"))
    ra, rb = (pq.read_table(tmp_path / n / "run" / "iter_001" / "rewards.parquet").to_pydict() for n in ("one", "two"))
    _separated_pairs(ra, rb, pa, pb)      # the pairs agree wherever the rewards are not near-ties


def test_iterations_can_train_against_a_fixed_reference(tmp_path, toy_model):
    cfg = config_from_dict(mini_config(tmp_path, toy_model, train_reference="base"))
    Controller(cfg).run()
    run = tmp_path / "run"
    it0 = json.loads((run / "iter_000" / "metrics.json").read_text())
    it1 = json.loads((run / "iter_001" / "metrics.json").read_text())
    assert it0["reference_model"] == it0["init_model"] == toy_model         # iteration 0: init = reference
    assert it1["init_model"] == str(run / "iter_000" / "model") and it1["reference_model"] == toy_model
    # at the first step the policy (iteration 0's model) already differs from the reference
    first = it1["history"][0]
    assert first["model_err_w"] != first["ref_err_w"]


def test_one_oracle_setting_drives_labels_evaluation_ranking_and_diagnostics(tmp_path, toy_model, one_thread):
    """toy.world.oracle is the only oracle: the toy labels, the held-out evaluation, the
    OnlineDPO ranking and the per-iteration diagnostics all score with it."""
    import io

    import numpy as np
    from PIL import Image

    from tests.datagen import brightness_oracle

    data = mini_config(tmp_path, toy_model)
    data["method"] = "online_dpo"
    data["toy"]["world"] = {**WORLD, "oracle": "tests.datagen:brightness_oracle"}
    Controller(config_from_dict(data)).run()
    run = tmp_path / "run"
    # labels: every decided pair's winner is the brighter image
    seed = pq.read_table(tmp_path / "toy_data" / "seed.parquet").to_pydict()
    decided = 0
    for jpg_0, jpg_1, label_0 in zip(seed["jpg_0"], seed["jpg_1"], seed["label_0"]):
        if label_0 == 0.5:
            continue
        b0, b1 = (brightness_oracle(np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))[None])[0]
                  for j in (jpg_0, jpg_1))
        assert (b0 > b1) == (label_0 == 1.0)
        decided += 1
    assert decided >= 6
    # evaluation, OnlineDPO rewards and diagnostics: brightness values, above the default's range
    for eval_dir in (run / "base_eval", run / "iter_000" / "eval", run / "iter_001" / "eval"):
        assert json.loads((eval_dir / "metrics.json").read_text())["oracle/mean"] > 1.0
    assert min(pq.read_table(run / "iter_001" / "rewards.parquet").column("reward").to_pylist()) > 1.0
    assert json.loads((run / "iter_001" / "diagnostics.json").read_text())["candidate_oracle_mean"] > 1.0
