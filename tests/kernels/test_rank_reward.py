"""Ranking reward: Triton path vs float64 PyTorch (CUDA, or CPU through the interpreter)."""
import pytest
import torch

from sail.kernels.rank_reward import (RankRewardOutput, rank_reward, rank_reward_reference,
                                      rank_reward_triton)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Outputs are fp32 reductions of exactly representable inputs: only summation order differs
# from float64, whatever the input dtype.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def make_inputs(P, N, K, S, dtype, shared, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn((P, K, *S) if shared else (P, N, K, *S), generator=g)
    t_full = t.unsqueeze(1).expand(P, N, K, *S) if shared else t
    c = t_full + 0.5 * torch.randn(t_full.shape, generator=g)
    r = c + 0.1 * torch.randn(t_full.shape, generator=g)
    return (x.to(device=device, dtype=dtype) for x in (c, r, t))


def float64_rank(c, r, t, beta):
    """Naive form in float64: per_draw = -beta/2 (e_cur - e_ref), reward = mean over draws."""
    P, N, K = c.shape[:3]
    t64 = t.double()
    if t64.shape != c.shape:
        t64 = t64.unsqueeze(1).expand(c.shape)
    e_cur = (c.double() - t64).flatten(3).pow(2).mean(-1)
    e_ref = (r.double() - t64).flatten(3).pow(2).mean(-1)
    per_draw = -0.5 * beta * (e_cur - e_ref)
    return per_draw.mean(-1), per_draw


def assert_close_rel(actual, expected, tol, what):
    expected = expected.to(actual.device)
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=what)


# (P, N, K, S, launch), run for every dtype and target layout: single row; several chunks per
# row with a short last chunk and N*K rows sharing a target; one 16384-long row pair.
CASES = [
    (1, 1, 1, (3, 5, 7), {}),
    (2, 3, 4, (3, 5, 7), dict(block=16, programs=60)),
    (1, 2, 1, (16384,), dict(block=1024, programs=10)),
]
# 5*3*17 = 255 rows: each program costs milliseconds in the interpreter, so two combinations.
MANY_ROWS = [
    (5, 3, 17, (3, 5, 7), dict(block=64, programs=510), torch.bfloat16, True),
    (5, 3, 17, (3, 5, 7), {}, torch.float32, False),
]


def _case_id(v):
    return str(v).replace(" ", "").replace("torch.", "")


@pytest.mark.parametrize("P,N,K,S,launch", CASES, ids=_case_id)
@pytest.mark.parametrize("shared", [False, True], ids=["per_candidate_target", "shared_target"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_case_id)
def test_triton_matches_float64(device, dtype, shared, P, N, K, S, launch):
    check_against_float64(device, dtype, shared, P, N, K, S, launch)


@pytest.mark.parametrize("P,N,K,S,launch,dtype,shared", MANY_ROWS, ids=_case_id)
def test_triton_many_rows_match_float64(device, P, N, K, S, launch, dtype, shared):
    check_against_float64(device, dtype, shared, P, N, K, S, launch)


def check_against_float64(device, dtype, shared, P, N, K, S, launch):
    c, r, t = make_inputs(P, N, K, S, dtype, shared, device)
    out = rank_reward_triton(c, r, t, 100.0, **launch)
    reward64, per_draw64 = float64_rank(c, r, t, 100.0)
    assert isinstance(out, RankRewardOutput)
    assert out.reward.shape == (P, N) and out.per_draw.shape == (P, N, K)
    assert out.reward.dtype == torch.float32 and out.per_draw.dtype == torch.float32
    assert_close_rel(out.per_draw, per_draw64, TOL[dtype], "per_draw")
    assert_close_rel(out.reward, reward64, TOL[dtype], "reward")


def test_shared_target_is_read_per_prompt_and_draw(device):
    """Each candidate must meet the target of its own prompt and draw: swapping two draws of
    the target changes exactly those per-draw rewards."""
    c, r, t = make_inputs(2, 3, 4, (3, 5, 7), torch.float32, True, device, seed=1)
    base = rank_reward_triton(c, r, t, 10.0, block=16, programs=60).per_draw
    t_swapped = t.clone()
    t_swapped[1, [0, 2]] = t[1, [2, 0]]
    swapped = rank_reward_triton(c, r, t_swapped, 10.0, block=16, programs=60).per_draw
    changed = (swapped - base).abs() > 1e-6 * base.abs().max()
    expected = torch.zeros_like(changed)
    expected[1, :, [0, 2]] = True
    assert torch.equal(changed, expected)


def test_bf16_is_upcast_before_arithmetic(device):
    """t = 1 + 2j u, c = t + 2u, r = t - u (u = 2^-7): (c - r)(c + r - 2t) = 3u^2 exactly, but in
    bf16 c + r = 2t + u is a tie that rounds to the even 2t, so bf16 arithmetic gives 0."""
    u = 2.0 ** -7
    g = torch.Generator().manual_seed(2)
    t = 1 + 2 * u * torch.randint(0, 48, (1, 1, 2, 4096), generator=g).double()
    c, r = t + 2 * u, t - u
    c16, r16, t16 = (x.to(torch.bfloat16) for x in (c, r, t))
    assert all(torch.equal(a.double(), b) for a, b in zip((c16, r16, t16), (c, r, t)))
    beta = 2.0 / (3 * u * u)                            # exact per_draw = -1
    out = rank_reward_triton(*(x.to(device) for x in (c16, r16, t16)), beta)
    torch.testing.assert_close(out.per_draw.double().cpu(), torch.full((1, 1, 2), -1.0, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    bf16_d = ((c16 - r16) * (c16 + r16 - 2 * t16)).float().mean(-1)
    assert bf16_d.abs().max() < 0.5 * 3 * u * u          # bf16 arithmetic would be visibly wrong


@pytest.mark.parametrize("shared", [False, True])
def test_public_on_cpu_is_the_reference(shared):
    c, r, t = make_inputs(2, 3, 2, (3, 5, 7), torch.bfloat16, shared, "cpu", seed=3)
    for a, b in zip(rank_reward(c, r, t, 10.0), rank_reward_reference(c, r, t, 10.0)):
        assert torch.equal(a, b)


def test_no_autograd_graph(device):
    c, r, t = make_inputs(1, 2, 2, (3, 5, 7), torch.float32, True, device, seed=4)
    out = rank_reward_triton(c.requires_grad_(), r, t, 10.0)
    assert not out.reward.requires_grad and not out.per_draw.requires_grad


def test_bad_layouts_raise(device):
    c = torch.zeros(2, 3, 4, 5, device=device)
    with pytest.raises(ValueError):
        rank_reward_triton(c, c, torch.zeros(2, 3, 5, device=device), 1.0)   # [P, N, *S]
    with pytest.raises(ValueError):
        rank_reward_triton(c, torch.zeros(2, 3, 4, 6, device=device), c, 1.0)
