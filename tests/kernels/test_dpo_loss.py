"""Fused DPO loss: Triton path vs float64 PyTorch, reference vs the official formula.

The Triton path runs on CUDA when present, else on CPU through the Triton interpreter
(``conftest.py``).  Shapes stay small so the interpreter suite finishes in seconds.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from sail.kernels.dpo_loss import DPOLossOutput, dpo_loss, dpo_loss_reference, dpo_loss_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Forward values are fp32 reductions of exactly representable inputs: only summation order
# differs from float64.  The gradient is rounded to the input dtype once (2^-24, 2^-9, 2^-12
# relative), plus fp32 noise.
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def make_inputs(pairs, S, dtype, shared, device, seed=0):
    """Target ~ N(0, 1); the policy predicts it with error 0.5 and the reference differs from
    the policy by 0.1 (a fine-tuned model near its reference), all rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn((pairs if shared else 2 * pairs, *S), generator=g)
    t_full = torch.cat([t, t]) if shared else t
    p = t_full + 0.5 * torch.randn(t_full.shape, generator=g)
    r = p + 0.1 * torch.randn(t_full.shape, generator=g)
    return (x.to(device=device, dtype=dtype) for x in (p, r, t))


def float64_dpo(p, r, t, beta):
    """The loss written naively (errors, then differences) in float64, with autograd grads."""
    pairs = p.shape[0] // 2
    p64 = p.detach().double().requires_grad_()
    t64 = t.double()
    if t64.shape[0] == pairs:
        t64 = torch.cat([t64, t64])
    model_err = (p64 - t64).flatten(1).pow(2).mean(1)
    ref_err = (r.double() - t64).flatten(1).pow(2).mean(1)
    d = model_err - ref_err
    z = -0.5 * beta * (d[:pairs] - d[pairs:])
    loss = -F.logsigmoid(z).mean()
    loss.backward()
    return loss.detach(), z.detach(), model_err.detach(), ref_err.detach(), p64.grad


def moderate_beta(p, r, t):
    """A beta that puts |z| near 2, where sigmoid(-z) and the gradient are far from saturated."""
    pairs = p.shape[0] // 2
    t64 = t.double() if t.shape[0] == p.shape[0] else torch.cat([t.double(), t.double()])
    d = ((p.double() - t64) ** 2 - (r.double() - t64) ** 2).flatten(1).mean(1)
    return 4.0 / float((d[:pairs] - d[pairs:]).abs().max())


def assert_close_rel(actual, expected, tol, what):
    expected = expected.to(actual.device)
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=what)


# (pairs, S, launch overrides), run for every dtype and target layout: ragged tiles
# (105 = 3*5*7), several chunks per row with a short last chunk, one 16384-long row pair.
CASES = [
    (1, (3, 5, 7), {}),
    (2, (2, 16, 16), dict(block=64, programs=64)),
    (3, (3, 5, 7), dict(block=16, programs=18)),
    (1, (16384,), dict(block=1024, programs=10)),
]
# Many rows (254 and 256): each program costs milliseconds in the interpreter, so these run for
# one dtype and layout each.
MANY_ROWS = [
    (127, (3, 5, 7), {}, torch.bfloat16, False),
    (128, (2, 4, 4), {}, torch.float32, True),
]


def _case_id(v):
    return str(v).replace(" ", "").replace("torch.", "")


@pytest.mark.parametrize("pairs,S,launch", CASES, ids=_case_id)
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_target", "shared_target"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_case_id)
def test_triton_forward_backward_match_float64(device, dtype, shared, pairs, S, launch):
    check_against_float64(device, dtype, shared, pairs, S, launch)


@pytest.mark.parametrize("pairs,S,launch,dtype,shared", MANY_ROWS, ids=_case_id)
def test_triton_many_rows_match_float64(device, pairs, S, launch, dtype, shared):
    check_against_float64(device, dtype, shared, pairs, S, launch)


def check_against_float64(device, dtype, shared, pairs, S, launch):
    p, r, t = make_inputs(pairs, S, dtype, shared, device)
    beta = moderate_beta(p, r, t)
    p.requires_grad_()
    out = dpo_loss_triton(p, r, t, beta, **launch)
    out.loss.backward()
    loss64, z64, me64, re64, grad64 = float64_dpo(p, r, t, beta)

    assert isinstance(out, DPOLossOutput)
    assert out.loss.shape == () and out.z.shape == (pairs,) and out.model_err.shape == (2 * pairs,)
    assert all(x.dtype == torch.float32 for x in out)
    tol = FWD_TOL[dtype]
    assert_close_rel(out.loss, loss64, tol, "loss")
    assert_close_rel(out.z, z64, tol * 10, "z")      # z amplifies d_w - d_l cancellation
    assert_close_rel(out.model_err, me64, tol, "model_err")
    assert_close_rel(out.ref_err, re64, tol, "ref_err")
    assert p.grad.dtype == dtype and p.grad.shape == p.shape
    assert_close_rel(p.grad, grad64, GRAD_TOL[dtype], "grad")


def test_gradient_formula_sign_and_scale(device):
    """dL/dp_w = +beta sigmoid(-z) (p_w - t) / (D P), and the opposite sign for the loser."""
    p, r, t = make_inputs(2, (3, 5, 7), torch.float32, False, device, seed=3)
    beta = moderate_beta(p, r, t)
    p.requires_grad_()
    out = dpo_loss_triton(p, r, t, beta)
    out.loss.backward()
    D, P = 105, 2
    coef = beta * torch.sigmoid(-out.z.double()) / (D * P)
    expected = torch.cat([coef, -coef]).view(-1, 1, 1, 1) * (p.detach().double() - t.double())
    assert_close_rel(p.grad, expected, 1e-5, "grad")


def test_incoming_grad_scales_and_retain_graph(device):
    """Gradient accumulation divides the loss: the incoming grad must scale the gradient, and a
    second backward through a retained graph must give the same gradient again."""
    p, r, t = make_inputs(3, (3, 5, 7), torch.bfloat16, True, device, seed=4)
    p.requires_grad_()
    loss = dpo_loss_triton(p, r, t, 50.0).loss
    (loss * 2.0).backward(retain_graph=True)
    once = p.grad.clone()
    (loss * 0.25).backward()
    torch.testing.assert_close(p.grad.float(), once.float() * 1.125, rtol=8e-3, atol=1e-8)
    ref = dpo_loss_reference(p, r, t, 50.0).loss
    g_ref, = torch.autograd.grad(ref * 2.0, p)
    torch.testing.assert_close(once.float(), g_ref.float(), rtol=8e-3, atol=1e-6)


def bf16_cancellation_inputs(device, n=4096):
    """bf16 rows on which the stable difference is exact in fp32 but wrong in bf16.

    t = 1 + 2j u (u = 2^-7, the bf16 spacing on [1, 2)), winner p = t + 2u, r = t - u:
    (p - r)(p + r - 2t) = 3u * u.  In bf16, p + r = 2t + u is a tie on the grid of spacing 2u
    and rounds to the even 2t, so bf16 arithmetic gives 0.  Loser rows p = t + u, r = t - u
    have difference 0 both ways.  So z = -beta/2 * 3u^2 in fp32, but 0 in bf16 arithmetic."""
    u = 2.0 ** -7
    g = torch.Generator().manual_seed(5)
    t = 1 + 2 * u * torch.randint(0, 48, (2, n), generator=g).double()
    p = torch.cat([t[:1] + 2 * u, t[1:] + u])
    r = t - u
    out = [x.to(torch.bfloat16) for x in (p, r, t)]
    assert all(torch.equal(a.double(), b) for a, b in zip(out, (p, r, t)))   # exact in bf16
    return [x.to(device) for x in out], 3 * u * u


def test_bf16_is_upcast_before_arithmetic(device):
    (p, r, t), d_w = bf16_cancellation_inputs(device)
    beta = 2.0 / d_w                                   # exact z = -1
    out = dpo_loss_triton(p, r, t, beta)
    expected_z = torch.tensor([-1.0], dtype=torch.float64)
    expected_loss = torch.tensor(math.log1p(math.e), dtype=torch.float64)    # -log sigmoid(-1)
    torch.testing.assert_close(out.z.double().cpu(), expected_z, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss.double().cpu(), expected_loss, rtol=1e-5, atol=0)
    # The same formula evaluated in bf16 arithmetic would give z = 0: the test can tell.
    bf16_d = ((p - r) * (p + r - 2 * t)).float().mean(1)
    assert abs(float(-0.5 * beta * (bf16_d[0] - bf16_d[1])) - (-1.0)) > 0.5


@pytest.mark.parametrize("shared", [False, True])
def test_public_on_cpu_is_the_reference(shared):
    p, r, t = make_inputs(2, (3, 5, 7), torch.bfloat16, shared, "cpu", seed=6)
    p1 = p.clone().requires_grad_()
    p2 = p.clone().requires_grad_()
    out, ref = dpo_loss(p1, r, t, 30.0), dpo_loss_reference(p2, r, t, 30.0)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    out.loss.backward()
    ref.loss.backward()
    assert torch.equal(p1.grad, p2.grad)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_gradient_reaches_only_model_pred(device, path):
    p, r, t = make_inputs(2, (3, 5, 7), torch.float32, False, device, seed=7)
    for x in (p, r, t):
        x.requires_grad_()
    fn = dpo_loss_triton if path == "triton" else dpo_loss_reference
    out = fn(p, r, t, 40.0)
    out.loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert r.grad is None and t.grad is None
    assert not (out.z.requires_grad or out.model_err.requires_grad or out.ref_err.requires_grad)


def test_no_grad_forward_and_mixed_dtypes(device):
    """Under no_grad nothing is saved for backward; p_ref may come in another dtype."""
    p, r, t = make_inputs(3, (3, 5, 7), torch.float32, True, device, seed=8)
    r = r.to(torch.bfloat16)
    with torch.no_grad():
        out = dpo_loss_triton(p, r, t, 25.0)
    assert out.loss.grad_fn is None
    loss64, z64, *_ = float64_dpo(p, r, t, 25.0)
    assert_close_rel(out.z, z64, 1e-4, "z")


def test_non_contiguous_inputs(device):
    p, r, t = make_inputs(2, (5, 7, 3), torch.float32, False, device, seed=9)
    pt, rt, tt = (x.transpose(1, 3) for x in (p, r, t))          # [4, 3, 7, 5] views
    pt = pt.detach().requires_grad_()
    out = dpo_loss_triton(pt, rt, tt, 20.0)
    out.loss.backward()
    loss64, z64, _, _, grad64 = float64_dpo(pt, rt, tt, 20.0)
    assert_close_rel(out.loss, loss64, 2e-5, "loss")
    assert_close_rel(pt.grad, grad64, 1e-5, "grad")


def test_bad_layouts_raise(device):
    x = torch.zeros(3, 4, device=device)
    with pytest.raises(ValueError):
        dpo_loss_triton(x, x, x, 1.0)                               # odd row count
    y = torch.zeros(4, 4, device=device)
    with pytest.raises(ValueError):
        dpo_loss_triton(y, y, torch.zeros(3, 4, device=device), 1.0)   # target rows not 2P or P


def official_diffusion_dpo_float64(model_pred, ref_pred, target, beta):
    """Diffusion-DPO training loss as written in the authors' script, in float64."""
    model_losses = (model_pred.double() - target.double()).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred.double() - target.double()).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside_term).mean(), inside_term


@pytest.mark.parametrize("beta", [5000.0, 2500.0])
@pytest.mark.parametrize("shared", [False, True])
def test_reference_matches_official_formula(beta, shared):
    """fp32 inputs; the policy differs from the reference by ~3e-3, as early in training."""
    g = torch.Generator().manual_seed(10)
    P, S = 4, (4, 16, 16)
    noise = torch.randn((P, *S), generator=g)
    target = noise if shared else torch.randn((2 * P, *S), generator=g)
    full = torch.cat([noise, noise]) if shared else target
    ref_pred = full + 0.3 * torch.randn(full.shape, generator=g)
    model_pred = ref_pred + 3e-3 * torch.randn(full.shape, generator=g)
    out = dpo_loss_reference(model_pred, ref_pred, target, beta)
    loss64, z64 = official_diffusion_dpo_float64(model_pred, ref_pred, full, beta)
    assert z64.abs().max() > 0.1                        # the margin is not trivially zero
    torch.testing.assert_close(out.loss.double(), loss64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.z.double(), z64, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Winner-preserving terms: DPOP hinge (hinge_weight) and winner SFT (sft_weight)
# ------------------------------------------------------------------------------------------------

def float64_objective(p, r, t, beta, sft_weight, hinge_weight):
    """The objective written naively in float64 (errors, then differences), autograd grads."""
    pairs = p.shape[0] // 2
    p64 = p.detach().double().requires_grad_()
    t64 = t.double() if t.shape[0] == p.shape[0] else torch.cat([t.double(), t.double()])
    model_err = (p64 - t64).flatten(1).pow(2).mean(1)
    d = model_err - (r.double() - t64).flatten(1).pow(2).mean(1)
    d_w, d_l = d[:pairs], d[pairs:]
    loss = -F.logsigmoid(-0.5 * beta * (d_w - d_l + hinge_weight * d_w.clamp_min(0))).mean()
    loss = loss + sft_weight * model_err[:pairs].mean()
    loss.backward()
    return loss.detach(), (-0.5 * beta * (d_w - d_l)).detach(), p64.grad


def mixed_sign_inputs(device, dtype, pairs=4, S=(3, 5, 7), seed=11):
    """Winners whose policy error is above the reference's (d_w > 0: the hinge is active) and
    below it (d_w < 0: inactive), alternating."""
    p, r, t = (x.cpu().double() for x in make_inputs(pairs, S, torch.float32, False, "cpu", seed=seed))
    for i in range(0, pairs, 2):          # move these winners' reference towards the target
        r[i] = t[i] + 0.5 * (r[i] - t[i])
    d_w = ((p[:pairs] - t[:pairs]) ** 2 - (r[:pairs] - t[:pairs]) ** 2).flatten(1).mean(1)
    assert (d_w[::2] > 0).all() and (d_w[1::2] < 0).all()
    return (x.to(device=device, dtype=dtype) for x in (p, r, t))


@pytest.mark.parametrize("terms", [dict(sft_weight=3.0), dict(hinge_weight=5.0),
                                   dict(sft_weight=3.0, hinge_weight=5.0)], ids=_case_id)
@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_case_id)
def test_winner_terms_match_float64(device, path, terms, dtype):
    p, r, t = mixed_sign_inputs(device, dtype)
    beta = moderate_beta(p, r, t)
    p.requires_grad_()
    fn = dpo_loss_triton if path == "triton" else dpo_loss_reference
    out = fn(p, r, t, beta, **terms, **(dict(block=16, programs=12) if path == "triton" else {}))
    out.loss.backward()
    loss64, z64, grad64 = float64_objective(p, r, t, beta, terms.get("sft_weight", 0.0),
                                            terms.get("hinge_weight", 0.0))
    assert_close_rel(out.loss, loss64, FWD_TOL[dtype], "loss")
    assert_close_rel(out.z, z64, FWD_TOL[dtype] * 10, "z (the plain DPO margin)")
    assert_close_rel(p.grad, grad64, GRAD_TOL[dtype], "grad")


def test_winner_terms_change_the_winner_rows_only(device):
    """The hinge multiplies an active winner's DPO gradient by (1 + lam) (at its own z); SFT adds
    2 gamma (p_w - t) / (D P) to every winner row; the losers' rows keep the DPO form."""
    p, r, t = mixed_sign_inputs(device, torch.float32)
    beta, lam, gamma, D, P = moderate_beta(p, r, t), 5.0, 3.0, 105, 4
    p.requires_grad_()
    out = dpo_loss_triton(p, r, t, beta, sft_weight=gamma, hinge_weight=lam)
    out.loss.backward()
    d = ((p.detach().double() - t.double()) ** 2 - (r.double() - t.double()) ** 2).flatten(1).mean(1)
    z_h = -0.5 * beta * (d[:P] - d[P:] + lam * d[:P].clamp_min(0))
    s = torch.sigmoid(-z_h)
    coef_w = beta * s * (1 + lam * (d[:P] > 0).double()) / (D * P) + 2 * gamma / (D * P)
    coef = torch.cat([coef_w, -beta * s / (D * P)]).view(-1, 1, 1, 1)
    assert_close_rel(p.grad, coef * (p.detach().double() - t.double()), 1e-5, "grad")


def test_zero_weights_are_plain_dpo_bit_for_bit():
    p, r, t = mixed_sign_inputs("cpu", torch.bfloat16)
    beta = moderate_beta(p, r, t)
    out = dpo_loss_reference(p, r, t, beta, sft_weight=0.0, hinge_weight=0.0)
    # plain Diffusion-DPO, the reference's formula written out
    pf, rf, tf = p.float().flatten(1), r.float().flatten(1), t.float().flatten(1)
    diff = ((pf - rf) * (pf + rf - 2 * tf)).mean(1)
    z = -0.5 * beta * (diff[:4] - diff[4:])
    assert torch.equal(out.loss, -F.logsigmoid(z).mean()) and torch.equal(out.z, z)


# ------------------------------------------------------------------------------------------------
# SSPO self-sampling regularization (self_sampling): the per-pair switch
# ------------------------------------------------------------------------------------------------

def float64_sspo(p, r, t, beta, sft_weight=0.0):
    """SSPO's loss written by hand in float64 from the paper's two branches, one pair at a time:
    d_w > 0 -> -log sigmoid(-beta/2 (d_w + d_ref)), else -log sigmoid(-beta/2 (d_w - d_ref))."""
    pairs = p.shape[0] // 2
    p64 = p.detach().double().requires_grad_()
    t64 = t.double() if t.shape[0] == p.shape[0] else torch.cat([t.double(), t.double()])
    model_err = (p64 - t64).flatten(1).pow(2).mean(1)
    d = model_err - (r.double() - t64).flatten(1).pow(2).mean(1)
    terms = []
    for i in range(pairs):
        d_w, d_ref = d[i], d[pairs + i]
        if d_w.item() > 0:
            terms.append(-F.logsigmoid(-0.5 * beta * (d_w + d_ref)))
        else:
            terms.append(-F.logsigmoid(-0.5 * beta * (d_w - d_ref)))
    loss = torch.stack(terms).mean() + sft_weight * model_err[:pairs].mean()
    loss.backward()
    return loss.detach(), (d[:pairs] > 0).double().detach(), p64.grad


@pytest.mark.parametrize("sft_weight", [0.0, 3.0], ids=["switch", "switch+sft"])
@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_case_id)
def test_sspo_switch_matches_float64(device, path, dtype, sft_weight):
    """Both branches in one batch (winners alternate d_w > 0 and d_w < 0): loss, switch flags
    and gradient against the float64 formula written per pair."""
    p, r, t = mixed_sign_inputs(device, dtype)
    beta = moderate_beta(p, r, t)
    p.requires_grad_()
    fn = dpo_loss_triton if path == "triton" else dpo_loss_reference
    out = fn(p, r, t, beta, self_sampling=True, sft_weight=sft_weight,
             **(dict(block=16, programs=12) if path == "triton" else {}))
    out.loss.backward()
    loss64, worse64, grad64 = float64_sspo(p, r, t, beta, sft_weight)
    assert worse64.tolist() == [1.0, 0.0, 1.0, 0.0]          # both branches are exercised
    assert out.winner_worse.cpu().double().tolist() == worse64.tolist()
    assert_close_rel(out.loss, loss64, FWD_TOL[dtype], "loss")
    assert_close_rel(p.grad, grad64, GRAD_TOL[dtype], "grad")


def test_sspo_switch_flips_only_the_switched_reference_rows(device):
    """On a switched pair (d_w > 0) the reference sample's gradient has the winner's sign (it is
    pulled towards the target too); elsewhere it is DPO's loser gradient."""
    p, r, t = mixed_sign_inputs(device, torch.float32)
    beta, D, P = moderate_beta(p, r, t), 105, 4
    p.requires_grad_()
    dpo_loss_triton(p, r, t, beta, self_sampling=True).loss.backward()
    d = ((p.detach().double() - t.double()) ** 2 - (r.double() - t.double()) ** 2).flatten(1).mean(1)
    q = torch.where(d[:P] > 0, -1.0, 1.0).double()
    s = torch.sigmoid(0.5 * beta * (d[:P] - q * d[P:]))
    coef = torch.cat([beta * s / (D * P), -q * beta * s / (D * P)]).view(-1, 1, 1, 1)
    assert_close_rel(p.grad, coef * (p.detach().double() - t.double()), 1e-5, "grad")
    # the switched pairs' reference rows descend their error, like winners
    assert ((p.grad[P::2] * (p.detach()[P::2] - t[P::2])).sum() > 0)


def test_sspo_without_a_switch_is_plain_dpo():
    """When no winner is fit worse than by the reference, SSPO is Diffusion-DPO with x_ref as
    the loser, bit for bit; and the DPOP hinge cannot be combined with the switch."""
    p, r, t = (x.cpu() for x in make_inputs(3, (4, 6), torch.float32, False, "cpu", seed=5))
    for i in range(3):                     # reference further from the target: d_w < 0
        r[i] = t[i] + 2.0 * (p[i] - t[i])
    beta = moderate_beta(p, r, t)
    plain, sspo = dpo_loss_reference(p, r, t, beta), dpo_loss_reference(p, r, t, beta, self_sampling=True)
    assert sspo.winner_worse.sum() == 0
    assert torch.equal(plain.loss, sspo.loss)
    with pytest.raises(ValueError, match="self_sampling"):
        dpo_loss_reference(p, r, t, beta, self_sampling=True, hinge_weight=1.0)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_winner_sft_alone_has_no_dpo_term(device, path):
    """dpo_term=False (the winners-only control): loss = gamma mean_pairs e_theta(w), gradient
    2 gamma (p_w - t) / (D P) on the winners and none on the losers."""
    p, r, t = mixed_sign_inputs(device, torch.float32)
    gamma, D, P = 3.0, 105, 4
    p.requires_grad_()
    fn = dpo_loss_triton if path == "triton" else dpo_loss_reference
    out = fn(p, r, t, 500.0, sft_weight=gamma, dpo_term=False,
             **(dict(block=16, programs=12) if path == "triton" else {}))
    out.loss.backward()
    p64, t64 = p.detach().double(), t.double()
    assert_close_rel(out.loss, gamma * (p64[:P] - t64[:P]).pow(2).flatten(1).mean(1).mean(), 2e-5, "loss")
    expected = torch.cat([2 * gamma * (p64[:P] - t64[:P]) / (D * P), torch.zeros_like(p64[P:])])
    assert_close_rel(p.grad, expected, 1e-5, "grad")
    with pytest.raises(ValueError, match="dpo_term=False"):
        fn(p, r, t, 500.0, dpo_term=False)
