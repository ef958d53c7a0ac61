"""The GPU code paths in bf16, on the CPU (AVX-512 BF16 / AMX run it natively): the training step,
generation, ranking, evaluation and the benchmarks, at tiny sizes. Each runs in bf16 for real
(the weights or the autocast outputs are bf16), and lands near its fp32 result."""
import json

import numpy as np
import pytest
import torch

from sail.engine.config import DistributedConfig, OptimizerConfig, SailConfig, SamplingConfig, TrainConfig
from sail.engine.ranks import single_process


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["tiny-sd15", "tiny-sdxl"])
def test_training_step_in_bf16(tiny_folders, arch):
    """Two DPO steps under bf16 autocast over fp32 master weights: the UNet's output is bf16,
    the weights and gradients stay fp32, and loss and update land near fp32's."""
    from sail.engine.data.cache import PairBatch
    from sail.engine.models import load_components, native_time_ids
    from sail.engine.strategy import LocalStrategy
    from sail.engine.trainer import dpo_forward

    def run(precision):
        comps = load_components(tiny_folders[arch], with_text=False, with_vae=False)
        ref = load_components(tiny_folders[arch], with_text=False, with_vae=False).unet
        s = LocalStrategy(TrainConfig(precision=precision, micro_batch_pairs=2, steps=10,
                                      optimizer=OptimizerConfig(name="adamw", lr=1e-3)), DistributedConfig())
        torch.manual_seed(0)
        with torch.no_grad():        # a policy apart from its reference: the loss is not log 2 exactly
            for p in comps.unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        s.prepare(comps.unet, ref, 10, 2)
        cfg, g = comps.unet.config, torch.Generator().manual_seed(0)
        shape = (2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        hidden = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
        pooled = None
        if arch == "tiny-sdxl":
            pooled = torch.randn(2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                 generator=g)
        batch = PairBatch(torch.randn(shape, generator=g), torch.randn(shape, generator=g), hidden, pooled)
        if pooled is not None:
            batch.time_ids_w = batch.time_ids_l = native_time_ids(cfg.sample_size * 8, 2)
        t, noise = torch.tensor([300, 700]), torch.randn(shape, generator=g)
        losses, before = [], [p.detach().clone() for p in s.policy.parameters()]
        for _ in range(2):
            out = dpo_forward(s, comps.noise_scheduler, batch, t, noise, torch.tensor([False, True]),
                              torch.zeros(1, 77, cfg.cross_attention_dim),
                              None if pooled is None else torch.zeros(1, pooled.shape[1]), 200.0)
            s.backward(out.loss)
            grads_dtype = {p.grad.dtype for p in s.policy.parameters() if p.grad is not None}
            s.step()
            losses.append(float(out.loss))
        with s.autocast():
            x = torch.randn(1, *shape[1:])
            kw = {"added_cond_kwargs": {"text_embeds": pooled[:1], "time_ids": batch.time_ids_w[:1]}} if pooled is not None else {}
            pred_dtype = s.policy(x, t[:1], encoder_hidden_states=hidden[:1], **kw).sample.dtype
        update = torch.cat([(p.detach() - b).flatten() for p, b in zip(s.policy.parameters(), before)])
        return losses, update, pred_dtype, grads_dtype, {p.dtype for p in s.policy.parameters()}

    l16, u16, pred16, g16, w16 = run("bf16")
    l32, u32, pred32, _, _ = run("fp32")
    assert pred16 == torch.bfloat16 and pred32 == torch.float32
    assert g16 == {torch.float32} and w16 == {torch.float32}          # fp32 master weights and grads
    assert all(np.isfinite(l16)) and abs(l16[0] - l32[0]) < 0.05 * abs(l32[0]) + 1e-3
    assert l16 != l32                                                 # bf16 arithmetic really ran
    assert u16.abs().max() > 0 and torch.nn.functional.cosine_similarity(u16, u32, dim=0) > 0.9


@pytest.mark.parametrize("arch", ["tiny-sd15", "tiny-sdxl"])
def test_generation_and_ranking_in_bf16(tiny_folders, tmp_path, arch):
    """sail.precision bf16: the generate stage's latents and the rank stage's rewards near the
    fp32 stages' (same seeds, same draws), and not equal to them."""
    from sail.engine import sail

    texts = ["w1 w2", "w3 w4 w5"]
    runs = {}
    for precision in ("bf16", "fp32"):
        cfg = SailConfig(candidates=3, chunk_prompts=2, precision=precision, rank_draws=4, rank_batch_size=6,
                         sampling=SamplingConfig(sampler="ddim", steps=3, guidance_scale=3.0, batch_size=4))
        out = tmp_path / precision
        cands_dir = sail.generate_candidates(tiny_folders[arch], texts, cfg, out / "candidates", seed=1,
                                             iteration=1, ranks=single_process())
        cands = sail.Candidates(cands_dir)
        sail.rank_candidates(cands, tiny_folders[arch], tiny_folders[arch], cfg, 5000.0, out / "rewards.parquet",
                             out / "rewards_chunks", seed=1, iteration=1, ranks=single_process())
        import pyarrow.parquet as pq

        latents = torch.cat([cands.of_prompt(p)[0] for p in range(len(texts))])
        rewards = pq.read_table(out / "rewards.parquet").to_pydict()
        runs[precision] = latents, torch.tensor(rewards["draws"], dtype=torch.float64)
    (lat16, draws16), (lat32, draws32) = runs["bf16"], runs["fp32"]
    assert torch.isfinite(lat16).all() and not torch.equal(lat16, lat32)
    assert _rel(lat16, lat32) < 0.05
    # the policy is its own reference here: every per-draw value is e_ref - e_cur of one model,
    # zero in fp32 up to rounding; in bf16 the same weights give the same zero
    assert draws32.abs().max() < 1e-6 and draws16.abs().max() < 1e-6


def test_ranking_reward_in_bf16_tracks_fp32():
    """reward_prompt with a policy that differs from its reference: bf16 rewards near fp32's,
    same ordering of clearly separated candidates."""
    from sail.engine.models import build_components
    from sail.engine.sail import reward_prompt

    comps = build_components("tiny-sd15", seed=0)
    ref = build_components("tiny-sd15", seed=0).unet
    with torch.no_grad():
        for p in comps.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = comps.unet.config
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(6, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    hidden = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        cur, r = comps.unet.to(dtype).eval(), ref.to(dtype).eval()
        out[dtype] = reward_prompt(cur, r, comps.noise_scheduler, latents, hidden, None, draws=4, beta=5000.0,
                                   seed=7, batch=12)[0]
    r16, r32 = out[torch.bfloat16].double(), out[torch.float32].double()
    assert not torch.equal(r16, r32) and r32.std() > 0
    assert np.corrcoef(r16.numpy(), r32.numpy())[0, 1] > 0.95


def test_toy_evaluation_in_bf16(toy_model, tmp_path, monkeypatch):
    """eval.precision bf16: the toy evaluation samples with bf16 weights; its images are those of
    fp32 up to a few grey levels."""
    from sail.engine.toy import evaluate as toy_eval
    from sail.engine.toy.world import all_prompts

    loaded, scored = [], []
    real_load, real_score = toy_eval.load_toy_model, toy_eval.score_images

    def load(folder, dtype=torch.float32):
        loaded.append(dtype)
        return real_load(folder, dtype)

    def score(images, prompts, scorers):
        scored.append(images.astype(np.int16))
        return real_score(images, prompts, scorers)

    monkeypatch.setattr(toy_eval, "load_toy_model", load)
    monkeypatch.setattr(toy_eval, "score_images", score)
    for precision in ("bf16", "fp32"):
        settings = toy_eval.EvalSettings(seeds_per_prompt=2, precision=precision, grid_prompts=2,
                                         sampling=SamplingConfig(steps=3, guidance_scale=1.5, batch_size=8))
        metrics = toy_eval.evaluate_model(toy_model, tmp_path / precision, all_prompts()[:3], settings, scorers={})
        assert json.loads((tmp_path / precision / "metrics.json").read_text())["settings"]["precision"] == precision
        assert metrics["n_images"] == 6
    assert loaded == [torch.bfloat16, torch.float32]
    diff = np.abs(scored[0] - scored[1])
    assert diff.mean() < 6 and diff.max() > 0


def test_generate_benchmark_in_bf16(tmp_path):
    """bench/generate.py at bf16: ours and the diffusers pipeline both run (the pipeline wholly
    in bf16) and a row is written."""
    from sail.bench import generate

    out = tmp_path / "g.jsonl"
    generate.main(["--arch", "tiny-sd15", "--images", "2", "--batch", "2", "--steps", "2", "--repeats", "1",
                   "--precision", "bf16", "--out", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["config"]["precision"] == "bf16"
    assert row["ours"]["images_per_s"] > 0 and row["diffusers"]["images_per_s"] > 0


def test_train_step_benchmark_in_bf16(tmp_path):
    from sail.bench import train_step

    out = tmp_path / "t.jsonl"
    train_step.main(["--arch", "tiny-sd15", "--attention", "sdpa", "--checkpointing", "0", "--optimizer", "adamw",
                     "--zero", "local", "--steps", "1", "--warmup", "0", "--precision", "bf16", "--out", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["precision"] == "bf16" and row["pairs_per_s"] > 0 and np.isfinite(row["loss"])


def test_e2e_benchmark_in_bf16(tmp_path):
    from sail.bench import e2e

    out = tmp_path / "e.jsonl"
    e2e.main(["--worlds", "tiny-sd15", "--stages", "rank", "train", "--variants", "fp32-eager", "bf16-eager",
              "--prompts", "1", "--candidates", "2", "--draws", "2", "--pairs", "1", "--repeats", "1", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["stage"], r["variant"]) for r in rows] == [("rank", "fp32-eager"), ("rank", "bf16-eager"),
                                                         ("train", "fp32-eager"), ("train", "bf16-eager")]
    assert all(r["s_median"] > 0 and r["env"]["git_sha"] for r in rows)
    assert [r["graph_breaks"] for r in rows] == [0, None, 0, None]
