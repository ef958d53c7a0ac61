"""Self-rankings whose answer is known by construction, so that swapping the current and the
reference model fails them.

``ExactDenoiser(x0_A)`` predicts the one noise that turns the clean latent x0_A into x_t:

    eps_hat(x_t, t) = (x_t - sqrt(a_t) x0_A) / sqrt(1 - a_t)        (a_t: alphas_cumprod)

so on candidate A (x_t = sqrt(a_t) x0_A + sqrt(1 - a_t) eps) its error is 0, and on candidate n
it is r_t ||x0_n - x0_A||^2 (mean over C, H, W) with r_t = a_t / (1 - a_t). Against a reference
that predicts zeros (error ||eps||^2), the implicit reward (losses.implicit_reward)

    reward_n = -beta/2 mean_k (e_cur - e_ref) = beta/2 mean_k (||eps_k||^2 - r_k ||x0_n - x0_A||^2)

is largest at A on every draw; with the models swapped it is the negation, smallest at A.
"""
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

N, BEST, BETA, DRAWS = 4, 2, 2.0, 8          # beta/2 = 1: the reward is e_ref - e_cur
SHAPE = (4, 8, 8)                              # C, h, w of the latents


class ExactDenoiser(nn.Module):
    """The epsilon-predictor of a one-image data set: the exact noise between x_t and ``x0``."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.unused = nn.Parameter(torch.zeros(()))   # the ranking reads dtype and device from it

    def forward(self, x, t, encoder_hidden_states=None, **kwargs):
        a = self.alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1))
        eps = (x.float() - a.sqrt() * self.x0) / (1 - a).sqrt()
        return SimpleNamespace(sample=eps.to(x.dtype))


class ZeroPredictor(nn.Module):
    """A reference that predicts no noise: its error is ||eps||^2 whatever the candidate."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, encoder_hidden_states=None, **kwargs):
        return SimpleNamespace(sample=torch.zeros_like(x))


def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")


def random_latents(seed: int, n: int = N) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def known_per_draw(latents, best: int, other: int | None, t, eps, alphas_cumprod) -> torch.Tensor:
    """The closed form above per draw, [N, K]: cur = ExactDenoiser(latents[best]), ref =
    ExactDenoiser(latents[other]) or ZeroPredictor (``other`` None). eps [K, ...] shared by the
    candidates or [N, K, ...] per candidate."""
    a = alphas_cumprod[t].double()
    ratio = (a / (1 - a))[None, :]                                                       # [1, K]

    def error_of_denoiser(m: int) -> torch.Tensor:                                       # [N, K]
        return ratio * (latents.double() - latents[m].double()).pow(2).flatten(1).mean(1)[:, None]

    e_cur = error_of_denoiser(best)
    e_ref = (eps.double().pow(2).flatten(eps.dim() - len(SHAPE)).mean(-1).expand_as(e_cur) if other is None
             else error_of_denoiser(other))
    return (-BETA / 2 * (e_cur - e_ref)).float()


def margin(reward: torch.Tensor, best: int) -> float:
    """The known best's lead over the runner-up (negative: it is not first)."""
    others = torch.cat([reward[:best], reward[best + 1:]])
    return float(reward[best] - others.max())


ATOL = 1e-4     # fp32 rewards of size <= 1e4 (r_t = a_t / (1 - a_t) reaches 1e4 at t = 0) against float64


@pytest.mark.parametrize("block", [0, 2], ids=["all_draws", "adaptive"])
@pytest.mark.parametrize("noise", ["shared", "antithetic", "own"])
@pytest.mark.parametrize("other", [None, 0], ids=["ref_zero", "ref_denoiser_of_0"])
def test_the_exact_denoiser_of_a_candidate_ranks_it_first_and_swapped_last(other, noise, block, one_thread):
    """The per-draw values are the closed form on the draws used; A is first (and the
    reference's own candidate, if any, last) with a lead far above the float error, on every
    draw where the noise is shared; swapping the models negates every value (the adaptive
    stop is symmetric too), so A is last."""
    from sail.engine.sail import ranking_draws, reward_prompt

    sched, latents, hidden = ddpm(), random_latents(0), torch.zeros(1, 3, 8)
    cur = ExactDenoiser(latents[BEST], sched.alphas_cumprod)
    ref = ZeroPredictor() if other is None else ExactDenoiser(latents[other], sched.alphas_cumprod)
    kw = dict(draws=DRAWS, beta=BETA, seed=11, batch=16, noise=noise, cand_seeds=[21, 22, 23, 24], block=block)
    reward, per_draw = reward_prompt(cur, ref, sched, latents, hidden, None, **kw)
    swapped, swapped_per_draw = reward_prompt(ref, cur, sched, latents, hidden, None, **kw)

    k = per_draw.shape[1]
    t, eps = ranking_draws(11, DRAWS, 1000, (0.0, 1.0), SHAPE, noise, kw["cand_seeds"])
    known = known_per_draw(latents, BEST, other, t[:k], eps[:, :k] if noise == "own" else eps[:k],
                           sched.alphas_cumprod)
    torch.testing.assert_close(per_draw, known, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(reward, per_draw.mean(1), rtol=1e-5, atol=1e-5)
    assert reward.argmax() == BEST and margin(reward, BEST) > 10 * ATOL, reward
    if other is not None:
        assert reward.argmin() == other
    if noise != "own" or other is not None:
        assert (per_draw.argmax(0) == BEST).all()
    torch.testing.assert_close(swapped_per_draw, -per_draw, rtol=1e-5, atol=1e-5)
    assert swapped.argmin() == BEST and margin(-swapped, BEST) > 10 * ATOL, swapped


# --------------------------------------------------------------------------------------------
# the rank stage, from candidate files on disk
# --------------------------------------------------------------------------------------------

def write_candidates(folder: Path, latents: list[torch.Tensor]) -> Path:
    """One chunk file of every prompt in generate_candidates' format, merged as it merges them."""
    from sail.engine.io import write_safetensors
    from sail.engine.sail import _merge_candidates, chunk_file

    folder.mkdir(parents=True)
    p = len(latents)
    rows = range(0, p)
    write_safetensors(folder / chunk_file(rows, ".safetensors"), {
        "latents": torch.cat(latents).float(), "hidden": torch.zeros(p, 3, 8).half(),
        "prompt_ids": torch.tensor(list(rows)), "seeds": torch.arange(p * N, dtype=torch.int64)})
    _merge_candidates(folder, [f"prompt {i}" for i in rows], N)
    return folder


@pytest.fixture
def two_prompts(tmp_path, monkeypatch):
    """Two prompts whose candidate A (one latent x0_A) is at index 2 and 0; model folders
    ``cur`` (loads as ExactDenoiser(x0_A)) and ``ref`` (loads as ZeroPredictor)."""
    import sail.engine.sail as sail

    sched, x0_a = ddpm(), random_latents(5, 1)
    first, second = random_latents(6), random_latents(7)
    first[2], second[0] = x0_a[0], x0_a[0]
    cands = sail.Candidates(write_candidates(tmp_path / "candidates", [first, second]))
    models = {"cur": ExactDenoiser(x0_a[0], sched.alphas_cumprod), "ref": ZeroPredictor()}
    for name in models:
        (tmp_path / name).mkdir()             # no vae/config.json: vae_scale_factor 1
    monkeypatch.setattr(sail, "load_components",
                        lambda folder, **kw: SimpleNamespace(unet=models[Path(folder).name], noise_scheduler=sched))
    monkeypatch.setattr(sail, "load_unet", lambda folder, dtype=None: models[Path(folder).name])
    return cands, tmp_path, {0: 2, 1: 0}


@pytest.mark.parametrize("swap", [False, True], ids=["cur_vs_ref", "swapped"])
def test_rank_stage_puts_the_known_best_first_and_swapped_last(two_prompts, swap, one_thread):
    """rank_candidates(cur_dir, ref_dir): rewards.parquet ranks A first in every prompt (one
    chunk per prompt, merged); with the folders swapped it ranks A last."""
    from sail.engine.config import SailConfig
    from sail.engine.ranks import single_process
    from sail.engine.sail import rank_candidates

    cands, root, best = two_prompts
    cur_dir, ref_dir = (root / "ref", root / "cur") if swap else (root / "cur", root / "ref")
    cfg = SailConfig(candidates=N, rank_draws=DRAWS, rank_batch_size=16, chunk_prompts=1, precision="fp32")
    out = rank_candidates(cands, str(cur_dir), str(ref_dir), cfg, BETA, root / "rewards.parquet",
                          root / "rewards_chunks", seed=3, iteration=1, ranks=single_process())
    table = pq.read_table(out).to_pydict()
    assert sorted(f.name for f in (root / "rewards_chunks").iterdir()) == [
        "prompts_000000-000001.parquet", "prompts_000001-000002.parquet"]
    assert [len(d) for d in table["draws"]] == [DRAWS] * 2 * N
    for p, known in best.items():
        reward = torch.tensor([r for q, r in zip(table["prompt_idx"], table["reward"]) if q == p])
        assert len(reward) == N
        if swap:
            assert reward.argmin() == known and margin(-reward, known) > 10 * ATOL, (p, reward)
        else:
            assert reward.argmax() == known and margin(reward, known) > 10 * ATOL, (p, reward)


# --------------------------------------------------------------------------------------------
# the controller hands the rank stage M_{i-1} as current and the ranking reference as reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reference, iteration, ref_model", [
    ("base", 2, -1), ("previous", 3, 1), ("previous", 1, -1)])
def test_controller_ranks_the_previous_model_against_the_reference(tmp_path, monkeypatch, reference,
                                                                   iteration, ref_model):
    """Controller.rank passes M_{i-1}'s folder as cur_dir and the reference's (base: the base
    model; previous: M_{i-2}, the base at i = 1) as ref_dir: named paths, not the same formula."""
    import sail.engine.sail as sail
    from sail.engine.config import SailConfig
    from sail.engine.controller import Controller
    from sail.engine.layout import RunLayout
    from sail.engine.ranks import single_process

    calls = []
    monkeypatch.setattr(sail, "Candidates", lambda folder: ("candidates", folder))
    monkeypatch.setattr(sail, "rank_candidates", lambda *args, **kw: calls.append((args, kw)) or args[5])
    layout = RunLayout(tmp_path / "run")
    cfg = SimpleNamespace(method="sail", seed=4, sail=SailConfig(rank_reference=reference),
                          train=SimpleNamespace(beta=5000.0))
    ctl = SimpleNamespace(cfg=cfg, layout=layout, plan=SimpleNamespace(base_model="/models/base"),
                          ranks=single_process(), world=None)
    ctl.model = lambda i: Controller.model(ctl, i)

    assert Controller.rank(ctl, iteration) == [layout.rewards(iteration)]
    (args, kw), = calls
    cands, cur_dir, ref_dir, sail_cfg, beta, out, parts = args
    assert cur_dir == str(layout.model(iteration - 1))
    assert ref_dir == ("/models/base" if ref_model < 0 else str(layout.model(ref_model)))
    assert cands == ("candidates", layout.candidates(iteration)) and sail_cfg is cfg.sail and beta == 5000.0
    assert (out, parts) == (layout.rewards(iteration), layout.rewards_chunks(iteration))
    assert kw["iteration"] == iteration and kw["seed"] == 4
