"""The way users run it: many ranks (3, an odd size, and 2) under the deepspeed launcher on
CPU, real-model worlds, learned scorers, kills and resumes on another world size.

Equalities compare what the code makes identical (per-prompt candidates and rewards do not
depend on the world size) at rounding tolerance, and trained weights within the tolerance of
the other multi-rank equality tests; pairs are compared where the reward gap is far above the
measured difference between the two runs, never as an argmax of near-ties.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.datagen import pickapic_rows, write_pickapic

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _deepspeed(ranks: int, port: int, config: Path, sets=(), kill_at: str | None = None, timeout: int = 900):
    script = ["tests/kill_at.py", kill_at, "launch/train.py"] if kill_at else ["launch/train.py"]
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), *script,
                           "--config", str(config), *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _tiny_folder(folder: Path, arch: str, seed: int = 0) -> str:
    from sail.engine.models import build_components, save_model_folder

    comps = build_components(arch, seed=seed)
    save_model_folder(folder, None, dict(comps.unet.config), comps, source=None)
    comps.unet.save_pretrained(folder / "unet", safe_serialization=True)     # the seeded weights
    return str(folder)


def _scorers(root: Path) -> dict:
    """Random-weight PickScore (a transformers CLIP folder) and LAION aesthetic head (its .pth
    state dict on a CLIP backbone), in the formats the real weights come in."""
    from tests.engine.evaluation.conftest import save_clip_folder

    clip = save_clip_folder(root / "clip")
    gen = torch.Generator().manual_seed(3)
    head = {f"layers.{i}.{k}": v for i, (o, n) in zip((0, 2, 4, 6, 7), [(1024, 16), (128, 1024), (64, 128), (16, 64),
                                                                         (1, 16)])
            for k, v in (("weight", torch.randn(o, n, generator=gen) / n ** 0.5), ("bias", torch.zeros(o)))}
    torch.save(head, root / "aesthetic.pth")
    return {"pickscore": {"weights": clip, "batch_size": 4},
            "aesthetic": {"weights": str(root / "aesthetic.pth"), "backbone": clip}}


def _weights(run: Path, i: int) -> dict:
    return load_file(str(run / f"iter_{i:03d}" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def _rewards(run: Path) -> dict:
    return pq.read_table(run / "iter_001" / "rewards.parquet").to_pydict()


def _history(run: Path, i: int) -> list:
    return json.loads((run / f"iter_{i:03d}" / "metrics.json").read_text())["history"]


def _same_training(a: Path, b: Path, i: int) -> None:
    """Per step: loss and gradient norm (a global scale error shows in the norm even where
    AdamW and clipping hide it from the weights); then the weights."""
    ha, hb = _history(a, i), _history(b, i)
    assert [r["step"] for r in ha] == [r["step"] for r in hb] and ha
    for ra, rb in zip(ha, hb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-3, abs=1e-6)
    wa, wb = _weights(a, i), _weights(b, i)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{b.name} {key}: {m}")


def _separated_pairs(a: dict, b: dict, pairs_a: dict, pairs_b: dict) -> int:
    """The two runs' rewards agree to far below their spread, and every prompt whose chosen
    pair is separated by more than 10x that disagreement has the same pair. Returns how many
    prompts were compared."""
    ra, rb = np.asarray(a["reward"]), np.asarray(b["reward"])
    noise = np.abs(ra - rb).max()
    assert noise < 1e-2 * (ra.max() - ra.min()), (noise, ra.max() - ra.min())
    compared = 0
    for row, p in enumerate(pairs_a["prompt_idx"]):
        rs = ra[np.asarray(a["prompt_idx"]) == p]
        top2, bottom2 = np.sort(rs)[-2:], np.sort(rs)[:2]
        if min(top2[1] - top2[0], bottom2[1] - bottom2[0]) > 10 * noise:
            assert (pairs_a["winner"][row], pairs_a["loser"][row]) == (pairs_b["winner"][row], pairs_b["loser"][row])
            compared += 1
    return compared


# --------------------------------------------------------------------------------------------
# SD1.5, pickapic world, learned scorers: 3 ranks, killed in generate and in rank, resumed on 2
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_world(tmp_path_factory):
    from tests.engine.test_split import recipe_shard

    root = tmp_path_factory.mktemp("sd15_world")
    model = _tiny_folder(root / "tiny_sd15", "tiny-sd15")
    config = {
        "name": "ws", "method": "sail", "seed": 0, "model": {"path": model},
        "data": {"train": [recipe_shard(root)], "resolution": 32, "encode_batch_size": 8, "random_flip": False},
        "pickapic": {"seed_pairs": 24, "pool_sizes": [6], "eval_prompts": 3},
        "train": {"beta": 500, "steps": 3, "micro_batch_pairs": 1, "grad_accum": 2, "log_every": 1, "save_every": 1,
                  # eps 1e-6: Adam with a tiny eps turns the rounding noise of zero gradients
                  # (conv biases ahead of GroupNorm) into +-lr steps that differ between orders
                  "optimizer": {"lr": 1e-3, "eps": 1e-6}},
        "distributed": {"backend": "deepspeed", "zero_stage": 2, "global_batch_pairs": 6},
        "sail": {"iterations": 1, "candidates": 3, "rank_draws": 4, "chunk_prompts": 1, "train_steps": 2,
                 "sampling": {"sampler": "ddim", "steps": 3, "guidance_scale": 3.0, "batch_size": 8},
                 "rank_batch_size": 12},
        "eval": {"enabled": True, "max_prompts": 3, "chunk_images": 1, "scorers": _scorers(root),
                 "sampling": {"sampler": "ddim", "steps": 2, "guidance_scale": 3.0, "batch_size": 4}}}
    return root, config


def _write(root: Path, name: str, config: dict) -> Path:
    path = root / f"{name}.json"
    path.write_text(json.dumps({**config, "run_dir": str(root / name)}))
    return path


def test_three_ranks_killed_in_generate_and_rank_resume_on_two_and_equal_an_uninterrupted_run(sd15_world):
    root, config = sd15_world
    # the uninterrupted run: 3 ranks, base evaluation with both scorers (the old first-evaluation hang)
    proc = _deepspeed(3, 29611, _write(root, "whole", config))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    whole = root / "whole"
    for folder in (whole / "base_eval", whole / "iter_000" / "eval", whole / "iter_001" / "eval"):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert np.isfinite(metrics["heldout/pickscore/mean"]) and np.isfinite(metrics["heldout/aesthetic/mean"])
        assert len(list((folder / "model" / "heldout" / "chunks").glob("*.parquet"))) == 3     # one per rank
    # killed: 3 ranks, once each has written one chunk of generation ...
    cut = _write(root, "cut", config)
    proc = _deepspeed(3, 29612, cut, kill_at="generate@1")
    assert proc.returncode != 0
    chunks = sorted(p.name for p in (root / "cut" / "iter_001" / "candidates").glob("prompts_*.safetensors"))
    assert 1 <= len(chunks) < 6, chunks
    # ... resumed on 2 ranks (the same global batch: accum 3), killed after one chunk of ranking ...
    two = ["train.grad_accum=3"]
    proc = _deepspeed(2, 29613, cut, two, kill_at="rank@1")
    assert proc.returncode != 0
    assert f"generate: resuming, {len(chunks)} of 6 chunks already done, {6 - len(chunks)} to do on 2 rank(s)" \
        in proc.stdout + proc.stderr
    ranked = len(list((root / "cut" / "iter_001" / "rewards_chunks").glob("prompts_*.parquet")))
    assert 1 <= ranked < 6
    # ... and resumed on 2 ranks to the end
    proc = _deepspeed(2, 29614, cut, two)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert f"rank: resuming, {ranked} of 6 chunks already done" in proc.stdout + proc.stderr
    cut = root / "cut"
    from sail.engine.sail import Candidates

    a, b = Candidates(whole / "iter_001" / "candidates"), Candidates(cut / "iter_001" / "candidates")
    assert a.prompts == b.prompts and len(a.prompts) == 6
    for p in range(6):        # the same chunks, the same batches: identical up to rounding
        torch.testing.assert_close(a.of_prompt(p)[0], b.of_prompt(p)[0], rtol=1e-5, atol=1e-6)
    ra, rb = _rewards(whole), _rewards(cut)
    assert (ra["prompt_idx"], ra["cand"]) == (rb["prompt_idx"], rb["cand"])
    torch.testing.assert_close(torch.tensor(ra["reward"]), torch.tensor(rb["reward"]), rtol=1e-5, atol=1e-6)
    pa_, pb_ = (pq.read_table(r / "iter_001" / "pairs.parquet").to_pydict() for r in (whole, cut))
    assert (pa_["winner"], pa_["loser"]) == (pb_["winner"], pb_["loser"])      # from the same rewards
    _same_training(whole, cut, 0)
    _same_training(whole, cut, 1)      # 3 ranks x accum 2 against 2 ranks x accum 3
    assert "zero 2" in json.loads((cut / "iter_001" / "metrics.json").read_text())["strategy"]


def test_a_changed_setting_on_resume_is_refused_on_every_rank(sd15_world):
    """A resume of the finished run with another ranking setting: one line, status 2, nothing
    recomputed (the manifest unchanged)."""
    root, config = sd15_world
    run = root / "whole"
    if not (run / "manifest.json").is_file():
        pytest.skip("needs the uninterrupted run of the test above")
    before = (run / "manifest.json").read_text()
    proc = _deepspeed(3, 29615, root / "whole.json", ["sail.rank_draws=5"], timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("the rank stage of iteration 1 finished with other settings: sail.rank_draws (4 -> 5)") == 1
    assert "Traceback" not in out and (run / "manifest.json").read_text() == before


# --------------------------------------------------------------------------------------------
# One bad shard, seen by one rank only
# --------------------------------------------------------------------------------------------

def test_a_bad_shard_on_one_rank_ends_every_rank_with_one_line(tmp_path):
    """Three ranks started by hand (so each one's status and stderr can be read); the shard
    with an undecodable image is encoded by rank 2 alone (data.strict)."""
    cols = pickapic_rows(12, size=(16, 16))
    cols["jpg_0"][9] = b"not an image"          # row 9: shard 2 of 4-pair shards -> rank 2
    data = write_pickapic(tmp_path / "pairs.parquet", cols)
    cfg = {"name": "bad", "run_dir": str(tmp_path / "run"), "model": {"arch": "tiny-sd15"},
           "data": {"train": [data], "resolution": 32, "strict": True, "encode_shard_pairs": 4},
           "train": {"steps": 2, "micro_batch_pairs": 1}, "distributed": {"backend": "deepspeed"},
           "eval": {"enabled": False}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    procs, start = [], time.monotonic()
    for rank in range(3):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="3", LOCAL_WORLD_SIZE="3",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="29621")
        procs.append(subprocess.Popen([sys.executable, "launch/train.py", "--config", str(path)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ended = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        ended.append((proc.returncode, time.monotonic() - start, err))
    assert [code for code, _, _ in ended] == [2, 2, 2], [e[2][-2000:] for e in ended]
    assert max(t for _, t, _ in ended) - min(t for _, t, _ in ended) < 60
    line = "Error: data.train: undecodable image in pair"
    assert ended[0][2].count(line) == 1 and "Traceback" not in ended[0][2]
    for _, _, err in ended[1:]:
        assert line not in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# SDXL recipe under ZeRO-3 on 2 ranks against one process
# --------------------------------------------------------------------------------------------

def test_sdxl_recipe_on_two_ranks_equals_one_process(tmp_path):
    """``sdxl_zero3.json`` as shipped (ZeRO-3, AdamW) on a generated shard and a tiny SDXL, on
    2 ranks killed once in generation and once in ranking, against one uninterrupted process;
    trained long enough (lr 1e-3, 4 steps) that the self-rewards stand well clear of the
    rounding difference between the two; evaluation with one scorer."""
    from tests.engine.test_split import recipe_shard, tiny_sdxl_folder

    shard, model = recipe_shard(tmp_path), tiny_sdxl_folder(tmp_path / "tiny_sdxl")
    scorer = _scorers(tmp_path)["pickscore"]
    common = [f"model.path={json.dumps(model)}", f"data.train={json.dumps([shard])}", 'train.precision="fp32"',
              "train.steps=4", "train.grad_accum=2", "train.save_every=2", "train.optimizer.lr=1e-3",
              "train.optimizer.eps=1e-6", "distributed.global_batch_pairs=null", "data.resolution=32",
              "data.cache_dir=null", "pickapic.seed_pairs=24", "pickapic.pool_sizes=[4]", "pickapic.eval_prompts=2",
              "sail.iterations=1", "sail.train_steps=2", "sail.candidates=3", "sail.rank_draws=4",
              "sail.chunk_prompts=1", "sail.sampling.steps=2", "sail.sampling.batch_size=8", "sail.rank_batch_size=12",
              "eval.enabled=true", "eval.benchmarks={}", f"eval.scorers={json.dumps({'pickscore': scorer})}",
              'eval.sampling={"sampler": "ddim", "steps": 2, "guidance_scale": 5.0, "batch_size": 4}']
    runs = {}
    launches = (("one", [sys.executable], None), ("two", ["deepspeed", "--num_gpus", "2", "--master_port", "29631"],
                                                 "generate@1"),
                ("two", ["deepspeed", "--num_gpus", "2", "--master_port", "29632"], "rank@1"),
                ("two", ["deepspeed", "--num_gpus", "2", "--master_port", "29633"], None))
    for name, launcher, kill in launches:
        sets = [*common, f"run_dir={json.dumps(str(tmp_path / name))}"]
        if name == "one":
            sets += ['distributed.backend="local"', "train.grad_accum=4"]        # the same global batch
        script = ["tests/kill_at.py", kill, "launch/train.py"] if kill else ["launch/train.py"]
        proc = subprocess.run([*launcher, *script, "--config", "sdxl_zero3.json",
                               *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=_env(), capture_output=True,
                              text=True, timeout=900)
        assert (proc.returncode != 0) if kill else (proc.returncode == 0), (proc.stdout + proc.stderr)[-5000:]
        runs[name] = tmp_path / name
    one, two = runs["one"], runs["two"]
    assert "rank: resuming, 2 of 4 chunks already done" in proc.stdout + proc.stderr    # 1 per rank before the kill
    from sail.engine.sail import Candidates

    ca, cb = Candidates(one / "iter_001" / "candidates"), Candidates(two / "iter_001" / "candidates")
    assert ca.prompts == cb.prompts and len(ca.prompts) == 4
    for p in range(4):      # model 0 differs by training's rounding only
        torch.testing.assert_close(ca.of_prompt(p)[0], cb.of_prompt(p)[0], rtol=1e-3, atol=1e-4)
    pa_, pb_ = (pq.read_table(r / "iter_001" / "pairs.parquet").to_pydict() for r in (one, two))
    assert _separated_pairs(_rewards(one), _rewards(two), pa_, pb_) >= 2
    _same_training(one, two, 0)
    for run in (one, two):
        metrics = json.loads((run / "iter_001" / "eval" / "metrics.json").read_text())
        assert np.isfinite(metrics["heldout/pickscore/mean"])
    assert "zero 3" in json.loads((two / "iter_001" / "metrics.json").read_text())["strategy"]


# --------------------------------------------------------------------------------------------
# DeepSpeed checkpoints: killed mid-training, resumed from the step it reached
# --------------------------------------------------------------------------------------------

def _dpo_config(tmp_path: Path, name: str, zero: int, **train) -> Path:
    data = write_pickapic(tmp_path / "pairs.parquet", pickapic_rows(12, size=(16, 16)))
    cfg = {"name": name, "run_dir": str(tmp_path / name), "seed": 5, "model": {"arch": "tiny-sd15"},
           "data": {"train": [data], "resolution": 16},
           # eps 1e-4: the conv biases ahead of a GroupNorm get gradients of pure rounding noise,
           # which Adam with a tiny eps turns into +-lr steps that differ between reduction
           # orders; at 1e-4 those steps stay far below the tolerance (the test checks that the
           # weights did train, by much more than it)
           "train": {"steps": 4, "micro_batch_pairs": 1, "grad_accum": 2, "log_every": 1, "beta": 500.0,
                     "save_every": 1, "optimizer": {"lr": 1e-3, "eps": 1e-4}, **train},
           "distributed": {"backend": "deepspeed", "zero_stage": zero, "global_batch_pairs": None},
           "eval": {"enabled": False}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_zero3_killed_mid_training_resumes_from_its_checkpoint(tmp_path):
    whole = _dpo_config(tmp_path, "whole", 3)
    assert _deepspeed(2, 29641, whole).returncode == 0
    cut = _dpo_config(tmp_path, "cut", 3)
    proc = _deepspeed(2, 29642, cut, kill_at="train@2")
    assert proc.returncode != 0 and (tmp_path / "cut" / "iter_000" / "checkpoints" / "step_2").is_dir()
    proc = _deepspeed(2, 29643, cut)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "iter0: resumed from the checkpoint of step 2 of 4" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "cut" / "iter_000" / "metrics.json").read_text())["resumed_from_step"] == 2
    _same_training(tmp_path / "whole", tmp_path / "cut", 0)
    # the same checkpoint on another world size: refused before any work, naming both
    again = _dpo_config(tmp_path, "again", 3)
    assert _deepspeed(2, 29644, again, kill_at="train@2").returncode != 0
    proc = _deepspeed(3, 29645, again, ["train.grad_accum=1", "train.micro_batch_pairs=1"], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "with backend deepspeed, world_size 2, zero_stage 3; this run has backend " \
                                      "deepspeed, world_size 3, zero_stage 3" in out, out[-3000:]


# --------------------------------------------------------------------------------------------
# Optimizers: exact at any world size, or refused
# --------------------------------------------------------------------------------------------

def test_adamw_under_zero2_and_zero3_on_one_two_and_three_ranks_equals_one_process(tmp_path):
    """Global batch 6 (micro 1 x accum 6 / W): the same losses, gradient norms and weights as
    the local strategy, whatever the ZeRO stage and the number of ranks."""
    local = _dpo_config(tmp_path, "local", 0, grad_accum=6)
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(local), "--set",
                           'distributed.backend="local"'], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = load_file(str(tmp_path / "local" / "base_model" / "unet" / "diffusion_pytorch_model.safetensors"))
    trained = _weights(tmp_path / "local", 0)
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 100 * 1e-5     # far above the tolerance
    port = 29650
    for zero in (2, 3):
        for ranks in (1, 2, 3):
            name = f"z{zero}_w{ranks}"
            proc = _deepspeed(ranks, port, _dpo_config(tmp_path, name, zero, grad_accum=6 // ranks))
            port += 1
            assert proc.returncode == 0, (name, (proc.stdout + proc.stderr)[-3000:])
            _same_training(tmp_path / "local", tmp_path / name, 0)


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw8bit"])
def test_non_elementwise_optimizers_are_refused_on_three_ranks(tmp_path, optimizer):
    proc = _deepspeed(3, 29660 + len(optimizer), _dpo_config(tmp_path, optimizer, 2, grad_accum=2),
                      [f'train.optimizer.name="{optimizer}"'], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and f"train.optimizer.name: {optimizer}" in out and "Traceback" not in out, out[-3000:]
    assert not (tmp_path / optimizer).exists()
