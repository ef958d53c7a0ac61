import math

import numpy as np
import pytest

from sail.engine.data.pickapic import DataError
from sail.engine.sail import choose_pairs, pair_confidence


def _rewards(draws: dict[int, list[list[float]]]) -> dict:
    """A rank stage's table from per-prompt, per-candidate draw values (reward = their mean)."""
    rows = {"prompt_idx": [], "cand": [], "reward": [], "draws": []}
    for p, cands in draws.items():
        for c, d in enumerate(cands):
            rows["prompt_idx"].append(p)
            rows["cand"].append(c)
            rows["reward"].append(float(np.mean(d)))
            rows["draws"].append(d)
    return rows


def test_pair_confidence_is_the_paired_t_statistic():
    w, l = [3.0, 5.0, 4.0, 6.0], [1.0, 4.0, 1.0, 3.0]        # differences 2, 1, 3, 3
    diff = np.array([2.0, 1.0, 3.0, 3.0])
    assert math.isclose(pair_confidence(w, l), diff.mean() / (diff.std(ddof=1) / 2))
    assert pair_confidence([2.0], [1.0]) == math.inf                 # a scorer: one deterministic value
    assert pair_confidence([1.0, 2.0], [0.0, 1.0]) == math.inf        # the same gap on every draw
    assert pair_confidence([1.0, 2.0], [1.0, 2.0]) == 0.0


def test_best_worst_with_a_confidence_threshold_skips_noisy_prompts():
    table = _rewards({
        0: [[1.0, 1.2, 0.9], [5.0, 5.1, 4.9], [0.0, 0.3, -0.1]],   # clear: winner 1, loser 2 (z ~ 74)
        1: [[1.0, -1.0, 2.0], [0.0, 2.0, 0.5], [0.4, 0.5, 0.6]],   # gap within the draws' noise
    })
    every = choose_pairs(table, "best_worst", seed=0)
    assert every["prompt_idx"] == [0, 1] and (every["winner"][0], every["loser"][0]) == (1, 2)
    assert every["z"][0] > 20 and every["z"][1] < 1
    confident = choose_pairs(table, "best_worst", seed=0, min_z=2.0)
    assert confident["prompt_idx"] == [0] and confident["z"] == every["z"][:1]
    with pytest.raises(DataError, match="sail.min_pair_z: no prompt's pair"):
        choose_pairs(table, "best_worst", seed=0, min_z=1e9)


def test_ranking_settles_when_best_and_worst_lead_their_neighbours():
    import torch

    from sail.engine.sail import ranking_settled

    clear = torch.tensor([[5.0, 5.2, 4.9, 5.1], [3.0, 3.1, 2.8, 3.2], [0.0, 0.2, -0.1, 0.1]])
    assert ranking_settled(clear, 2.0)
    muddled = torch.tensor([[5.0, 1.0, 4.0, 2.0], [3.0, 3.1, 2.8, 3.2], [0.0, 0.2, -0.1, 0.1]])
    assert not ranking_settled(muddled, 2.0)       # the best's lead over the runner-up is noise
    assert not ranking_settled(clear[:, :1], 2.0)   # one draw has no standard error


def test_adaptive_ranking_uses_a_prefix_of_the_same_draws(one_thread):
    """rank_block > 0 draws the same (t, noise) sequence as all K at once, block by block, and
    stops at a block boundary; the reward is the mean of the draws used."""
    import torch
    from diffusers import DDPMScheduler

    from sail.engine.sail import ranking_settled, reward_prompt
    from tests.engine.test_optim import tiny_unet

    cur, ref = tiny_unet(0).eval(), tiny_unet(1).eval()
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(3, 4, 16, 16, generator=g), torch.randn(1, 16, 32, generator=g)
    kw = dict(draws=8, beta=500.0, seed=7, batch=48)
    full_reward, full = reward_prompt(cur, ref, sched, latents, hidden, None, **kw)
    for settle_z in (0.01, 1e9):                    # settles at once / never settles
        reward, used = reward_prompt(cur, ref, sched, latents, hidden, None, **kw, block=2, settle_z=settle_z)
        k = used.shape[1]
        assert k == (2 if settle_z < 1 else 8) and ranking_settled(used, settle_z) == (settle_z < 1)
        torch.testing.assert_close(used, full[:, :k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reward, full[:, :k].mean(1), rtol=1e-5, atol=1e-5)
    # sail.rank_min_draws: the first settle test comes after 6 draws (a block boundary at or past it)
    _, used = reward_prompt(cur, ref, sched, latents, hidden, None, **kw, block=2, settle_z=0.01, min_draws=5)
    assert used.shape[1] == 6
    torch.testing.assert_close(used, full[:, :6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_reward, full.mean(1), rtol=1e-5, atol=1e-5)
    # a timestep window changes the draws
    _, windowed = reward_prompt(cur, ref, sched, latents, hidden, None, **kw, t_range=(0.5, 1.0))
    assert not torch.allclose(windowed, full)


def test_ranking_draw_noise_modes():
    """shared: K draws common to the candidates; antithetic: (t, eps), (t, -eps) pairs; own: each
    candidate's generation noise (what sample_latents starts from for its seed) at every draw."""
    import torch

    from sail.engine.sail import ranking_draws
    from sail.engine.sampling import initial_noise

    shape = (4, 8, 8)
    t, eps = ranking_draws(3, 6, 1000, (0.5, 1.0), shape)
    assert eps.shape == (6, *shape) and ((t >= 500) & (t < 1000)).all()
    t_a, eps_a = ranking_draws(3, 5, 1000, (0.0, 1.0), shape, "antithetic")
    assert eps_a.shape == (5, *shape) and torch.equal(t_a[0::2][:2], t_a[1::2][:2])
    assert torch.equal(eps_a[1], -eps_a[0]) and torch.equal(eps_a[3], -eps_a[2])
    t_o, eps_o = ranking_draws(3, 6, 1000, (0.0, 1.0), shape, "own", cand_seeds=[11, 12, 13])
    assert eps_o.shape == (3, 6, *shape)
    own = initial_noise([11, 12, 13], shape)
    for k in range(6):
        torch.testing.assert_close(eps_o[:, k], own, rtol=0, atol=0)


def test_own_noise_ranks_each_candidate_on_its_own_noise(one_thread):
    """The per-candidate path of the reward equals ranking each candidate alone with its noise
    as the shared noise of a one-candidate prompt."""
    import torch
    from diffusers import DDPMScheduler

    from sail.engine.sail import reward_prompt
    from tests.engine.test_optim import tiny_unet

    cur, ref = tiny_unet(0).eval(), tiny_unet(1).eval()
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(3, 4, 16, 16, generator=g), torch.randn(1, 16, 32, generator=g)
    kw = dict(draws=4, beta=500.0, seed=7, batch=48)
    reward, per = reward_prompt(cur, ref, sched, latents, hidden, None, **kw, noise="own", cand_seeds=[5, 6, 7])
    from sail.engine.sail import _reward_draws, ranking_draws

    t, eps = ranking_draws(7, 4, 1000, (0.0, 1.0), latents.shape[1:], "own", [5, 6, 7])
    for n in range(3):
        alone = _reward_draws(cur, ref, sched, latents[n:n + 1], hidden, None, t, eps[n], 500.0, 48, 8)
        torch.testing.assert_close(per[n], alone.per_draw[0, 0].cpu(), rtol=1e-5, atol=1e-6)


def test_mix_proportions_and_the_seed_only_control():
    from collections import Counter

    from sail.engine.sail import mix_pairs

    mixed = Counter(c for c, _ in mix_pairs(32, 384, 0.25, seed=1))
    assert mixed == {1: 32, 0: 96}                                  # alpha 0.25: 1 generated : 3 seed
    assert Counter(c for c, _ in mix_pairs(32, 384, 1.0, seed=1)) == {1: 32}
    seed_only = mix_pairs(32, 384, 0.0, seed=1)                      # every seed pair, no generated one
    assert seed_only == [(0, r) for r in range(384)]


def test_best_against_mu_minus_two_sigma_skips_an_extreme_outlier():
    from sail.engine.sail import pick_pairs

    rs = np.array([0.1 * i for i in range(19)] + [-6.0])       # one degenerate candidate far below
    target = rs.mean() - 2 * rs.std()
    [(w, l)] = pick_pairs(rs, "best_mu2sigma")
    assert w == 18 and l == 0 and abs(rs[0] - target) < abs(rs[19] - target)
    assert pick_pairs(rs, "best_worst") == [(18, 19)]
    small = np.array([0.3, -0.2, 0.9, -0.4])                   # no outlier: the worst is the nearest
    assert pick_pairs(small, "best_mu2sigma") == pick_pairs(small, "best_worst") == [(2, 3)]
    [(a, b)] = pick_pairs(small, "random", 5)
    assert a != b and small[a] >= small[b]
    rng = np.random.default_rng(5)                              # one random pair: the draw it always was
    first, second = rng.choice(4, size=2, replace=False)
    assert {a, b} == {int(first), int(second)}


def test_several_pairs_per_prompt_nest_from_the_extremes_inwards():
    from sail.engine.sail import pick_pairs

    rs = np.array([0.5, 2.0, -1.0, 0.0, 3.0, 1.0, -2.0, 0.7])   # ranks: 4 1 5 7 | 0 3 2 6
    assert pick_pairs(rs, "best_worst", per_prompt=1) == [(4, 6)]
    assert pick_pairs(rs, "best_worst", per_prompt=3) == [(4, 6), (1, 2), (5, 3)]
    assert pick_pairs(rs, "best_worst", per_prompt=4) == [(4, 6), (1, 2), (5, 3), (7, 0)]
    flat = np.zeros(4)                                          # ties: still two distinct candidates a pair
    assert pick_pairs(flat, "best_worst", per_prompt=2) == [(0, 2), (1, 3)]
    pairs = pick_pairs(rs, "random", 11, per_prompt=4)
    used = [c for pair in pairs for c in pair]
    assert sorted(used) == list(range(8))                       # disjoint: every candidate once
    assert all(rs[w] >= rs[l] for w, l in pairs)
    assert pairs != pick_pairs(rs, "best_worst", per_prompt=4)
    unranked = pick_pairs(rs, "random_unranked", 11, per_prompt=4)     # the same pairs, in drawn order
    assert sorted(map(sorted, unranked)) == sorted(map(sorted, pairs))
    assert any(rs[w] < rs[l] for w, l in unranked)
    assert pick_pairs(-rs, "random_unranked", 11, per_prompt=4) == unranked  # the rewards play no part


def test_choose_pairs_takes_every_pair_of_every_prompt_and_filters_each():
    table = _rewards({
        0: [[4.0, 4.1, 3.9], [1.0, 1.1, 0.9], [3.0, 3.1, 2.9], [0.0, 0.1, -0.1]],
        1: [[1.0, -1.0, 2.0], [0.0, 2.0, 0.5], [5.0, 5.1, 4.9], [0.4, 0.5, 0.6]],
    })
    two = choose_pairs(table, "best_worst", seed=0, per_prompt=2)
    assert two["prompt_idx"] == [0, 0, 1, 1]
    assert list(zip(two["winner"], two["loser"])) == [(0, 3), (2, 1), (2, 3), (1, 0)]
    assert two["margin"][1] == pytest.approx(2.0)
    kept = choose_pairs(table, "best_worst", seed=0, min_z=2.0, per_prompt=2)
    assert kept["prompt_idx"] == [0, 0, 1]                      # prompt 1's inner pair is noise (z < 1)


def test_pairs_per_prompt_is_checked_against_the_candidates():
    from sail.engine.config import config_from_dict
    from sail.engine.configtree import ConfigError

    assert config_from_dict({"name": "x", "sail": {"pairs_per_prompt": 4}}).sail.pairs_per_prompt == 4
    with pytest.raises(ConfigError, match=r"sail\.pairs_per_prompt: must be in 1..candidates/2 = 4, got 5"):
        config_from_dict({"name": "x", "sail": {"pairs_per_prompt": 5}})
    with pytest.raises(ConfigError, match="best_mu2sigma takes one pair"):
        config_from_dict({"name": "x", "sail": {"pairing": "best_mu2sigma", "pairs_per_prompt": 2}})
