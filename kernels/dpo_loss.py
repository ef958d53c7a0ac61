"""Diffusion-DPO loss (Wallace et al., CVPR 2024, eq. 14 with the per-sample mean error).

Layout: predictions are ``[2P, *S]`` with all winners first, then all losers. The target
(noise for epsilon-prediction, velocity for v-prediction) is either per sample ``[2P, *S]`` or
shared by the two images of a pair ``[P, *S]`` (epsilon-prediction with shared noise).

With ``e_m(x) = mean_S (target - pred_m)^2``:

    d    = e_theta - e_ref                         (per row, computed in the stable form
         = mean_S (p_theta - p_ref) * (p_theta + p_ref - 2 target)    below, in fp32)
    z    = -beta/2 * (d_w - d_l)                   (per pair)
    loss = mean_pairs -log sigmoid(z)

The difference form avoids the catastrophic cancellation of ``e_theta - e_ref`` when the
policy starts equal to the reference (bf16 errors agree to ~3 digits).

Winner-preserving terms (both 0 by default, and then the loss is plain DPO bit for bit). Plain
Diffusion-DPO can raise the policy's error on winners and losers alike (Diffusion-SDPO,
arXiv 2511.03317; docs/sail_toy.md measures it on the toy world); two published remedies,
functions of the same per-row sums:

    hinge_weight lam  (DPOP, Pal et al., "Smaug: Fixing Failure Modes of Preference
                       Optimisation with DPO-Positive", arXiv 2402.13228, in the
                       diffusion form where log-ratio_w = -beta/2 d_w):
                       z_h  = -beta/2 (d_w - d_l + lam max(0, d_w)),  loss = mean -log sigmoid(z_h)
    sft_weight gamma  (DPO + NLL on the winners, Pang et al., "Iterative Reasoning Preference
                       Optimization", arXiv 2404.19733; the NLL of a diffusion model is
                       its denoising error):
                       loss += gamma mean_pairs e_theta(w)

SSPO's self-sampling regularization (``self_sampling=True``; Zhang et al., "Bridging SFT and
DPO for Diffusion Model Alignment with Self-Sampling Preference Optimization", arXiv
2410.05255). The "loser" rows are the reference model's own samples x_ref; per pair, when the
policy already fits the winner worse than the reference (d_w > 0) x_ref is treated as a second
winner, otherwise as the loser:

    q    = -1 if d_w > 0 else +1               (the switch; no gradient through it)
    z_s  = -beta/2 (d_w - q d_l),  loss = mean -log sigmoid(z_s)

(d_w > 0: -log sigmoid(-beta/2 (d_w + d_ref)), the SFT-like branch; else Diffusion-DPO with
x_ref as the loser.) The paper's text gives no more than this; the rule lives here and in the
kernel's finalize only, and tests/kernels/test_dpo_loss.py pins both to a float64 formula.

``dpo_term=False`` drops the DPO term and leaves the winner SFT term alone (the winners-only
control of the SAIL table: what the winner term does without any preference signal).

``z`` returned is always the DPO margin ``-beta/2 (d_w - d_l)`` (implicit accuracy, logs), and
``winner_worse`` the per-pair flag ``d_w > 0`` (SSPO's switch; under plain DPO the share of
pairs whose winner the policy fits worse than the reference).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # Triton is optional: without it every call takes the PyTorch reference.
    from sail.kernels import _dpo_loss_triton as _triton_impl
    from sail.kernels._triton_rows import plan_rows as _plan_rows
except ImportError:  # pragma: no cover - exercised only on installs without triton
    _triton_impl = None


class DPOLossOutput(NamedTuple):
    """loss: scalar fp32, differentiable w.r.t. ``model_pred``.
    z: [P] fp32 detached, the implicit reward margin of each pair (> 0: winner preferred).
    model_err: [2P] fp32 detached, e_theta per row.  ref_err: [2P] fp32 detached, e_ref per row.
    winner_worse: [P] fp32 detached, 1 where d_w > 0 (the SSPO switch), else 0.
    """

    loss: torch.Tensor
    z: torch.Tensor
    model_err: torch.Tensor
    ref_err: torch.Tensor
    winner_worse: torch.Tensor


def _check_layout(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor) -> int:
    if model_pred.shape != ref_pred.shape:
        raise ValueError(f"model_pred {tuple(model_pred.shape)} and ref_pred {tuple(ref_pred.shape)} differ")
    rows = model_pred.shape[0]
    if rows % 2 or rows == 0:
        raise ValueError(f"expected [winners; losers] with an even, non-zero row count, got {rows}")
    pairs = rows // 2
    if target.shape[1:] != model_pred.shape[1:] or target.shape[0] not in (rows, pairs):
        raise ValueError(
            f"target {tuple(target.shape)} must be [2P, *S] or [P, *S] for predictions {tuple(model_pred.shape)}")
    return pairs


def _check_terms(hinge_weight: float, self_sampling: bool, sft_weight: float = 0.0, dpo_term: bool = True) -> None:
    if hinge_weight and self_sampling:
        raise ValueError("self_sampling (SSPO) and hinge_weight (DPOP) change the same margin: use one of them")
    if not dpo_term and (hinge_weight or self_sampling or not sft_weight):
        raise ValueError("dpo_term=False leaves only the winner SFT term: needs sft_weight > 0, no hinge or switch")


def dpo_loss_reference(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                       beta: float, *, sft_weight: float = 0.0, hinge_weight: float = 0.0,
                       self_sampling: bool = False, dpo_term: bool = True) -> DPOLossOutput:
    """PyTorch reference of the fused kernel (fp32 arithmetic whatever the input dtype)."""
    pairs = _check_layout(model_pred, ref_pred, target)
    _check_terms(hinge_weight, self_sampling, sft_weight, dpo_term)
    p = model_pred.float().flatten(1)
    r = ref_pred.detach().float().flatten(1)
    t = target.detach().float().flatten(1)
    if t.shape[0] == pairs:
        t = torch.cat([t, t])
    diff = ((p - r) * (p + r - 2 * t)).mean(1)            # e_theta - e_ref, stable form
    d_w, d_l = diff[:pairs], diff[pairs:]
    z = -0.5 * beta * (d_w - d_l)
    worse = (d_w > 0).detach()
    z_loss = -0.5 * beta * (d_w - d_l + hinge_weight * d_w.clamp_min(0)) if hinge_weight else z
    if self_sampling:
        z_loss = -0.5 * beta * (d_w + torch.where(worse, d_l, -d_l))
    loss = -F.logsigmoid(z_loss).mean() if dpo_term else p.new_zeros(())
    if sft_weight:
        loss = loss + sft_weight * (p[:pairs] - t[:pairs]).pow(2).mean(1).mean()
    with torch.no_grad():
        model_err = (p.detach() - t).pow(2).mean(1)
        ref_err = (r - t).pow(2).mean(1)
    return DPOLossOutput(loss, z.detach(), model_err, ref_err, worse.float())


class _FusedDPOLoss(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels (``kernels._dpo_loss_triton``).

    Forward: one pass over p_theta, p_ref, target + a one-program finalize.  Backward: one pass
    over p_theta, target writing the gradient.  The gradient is produced in backward rather than
    in forward (where Liger's losses produce it) because the incoming grad of the loss is almost
    never 1 in DPO training (gradient accumulation divides the loss, fp16 loss scaling multiplies
    it): folding it into the per-row coefficient inside the kernel costs nothing, whereas
    rescaling a gradient precomputed in forward would be a third pass (or a host sync to skip
    it), and an in-place rescale would be wrong under ``retain_graph``.  Peak memory is the same
    either way: p_theta and its gradient coexist once, at the end of forward or at the start of
    backward (the activation peak in both cases); no fp32 intermediate is saved.
    """

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, sft_weight, hinge_weight, self_sampling, dpo_term, block,
                programs):
        rows = model_pred.shape[0]
        p2 = model_pred.detach().contiguous().view(rows, -1)
        r2 = ref_pred.detach().contiguous().view(rows, -1)
        t2 = target.detach().contiguous().view(target.shape[0], -1)
        plan = _plan_rows(rows, p2.shape[1], p2.device, block, programs)
        loss, z, model_err, ref_err, worse, coef = _triton_impl.dpo_forward(p2, r2, t2, beta, plan, sft_weight,
                                                                            hinge_weight, self_sampling, dpo_term)
        ctx.mark_non_differentiable(z, model_err, ref_err, worse)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(p2, t2, coef)
            ctx.plan = plan
            ctx.pred_shape = model_pred.shape
        return loss, z, model_err, ref_err, worse

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        p2, t2, coef = ctx.saved_tensors
        grad = _triton_impl.dpo_backward(p2, t2, coef, grad_loss.float(), ctx.plan)
        # ref_pred and target are constants of the loss: no gradient (as in the reference).
        return grad.view(ctx.pred_shape), None, None, None, None, None, None, None, None, None


def dpo_loss_triton(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                    beta: float, *, sft_weight: float = 0.0, hinge_weight: float = 0.0, self_sampling: bool = False,
                    dpo_term: bool = True, block: int | None = None, programs: int | None = None) -> DPOLossOutput:
    """Fused Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``); same contract as
    :func:`dpo_loss_reference`.

    model_pred, ref_pred: ``[2P, *S]`` ([all winners; all losers]), bf16/fp16/fp32.
    target: ``[2P, *S]`` or ``[P, *S]`` (shared by a pair, read as row ``i mod P``).

        d_i  = mean_S (p_theta - p_ref)(p_theta + p_ref - 2 target)       (fp32)
        z    = -beta/2 (d_w - d_l),   loss = mean_pairs -log sigmoid(z)

    ``sft_weight`` / ``hinge_weight``: the winner-preserving terms; ``self_sampling``: SSPO's
    switch; ``dpo_term=False``: the winner SFT term alone (module docstring). Returns ``DPOLossOutput(loss [], z [P], model_err [2P],
    ref_err [2P], winner_worse [P])`` in fp32; only
    ``loss`` is differentiable, and only w.r.t. ``model_pred``.  ``block`` (tile size) and
    ``programs`` (wanted grid size) override the launch heuristics, for tests.
    """
    if _triton_impl is None:
        raise RuntimeError("dpo_loss_triton needs triton, which is not installed")
    _check_layout(model_pred, ref_pred, target)
    _check_terms(hinge_weight, self_sampling, sft_weight, dpo_term)
    if model_pred[0].numel() == 0:
        raise ValueError(f"empty rows: model_pred {tuple(model_pred.shape)}")
    return DPOLossOutput(*_FusedDPOLoss.apply(model_pred, ref_pred, target, float(beta), float(sft_weight),
                                              float(hinge_weight), bool(self_sampling), bool(dpo_term), block,
                                              programs))


def dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
             beta: float, *, sft_weight: float = 0.0, hinge_weight: float = 0.0,
             self_sampling: bool = False, dpo_term: bool = True) -> DPOLossOutput:
    """Public entry point: the fused Triton kernel on CUDA tensors, the reference elsewhere.

    Shapes and equation as in :func:`dpo_loss_triton` / the module docstring.
    """
    on_cuda = model_pred.is_cuda and ref_pred.is_cuda and target.is_cuda
    terms = dict(sft_weight=sft_weight, hinge_weight=hinge_weight, self_sampling=self_sampling, dpo_term=dpo_term)
    if on_cuda and _triton_impl is not None:
        return dpo_loss_triton(model_pred, ref_pred, target, beta, **terms)
    return dpo_loss_reference(model_pred, ref_pred, target, beta, **terms)
