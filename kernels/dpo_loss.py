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
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DPOLossOutput(NamedTuple):
    """loss: scalar fp32, differentiable w.r.t. ``model_pred``.
    z: [P] fp32 detached, the implicit reward margin of each pair (> 0: winner preferred).
    model_err: [2P] fp32 detached, e_theta per row.  ref_err: [2P] fp32 detached, e_ref per row.
    """

    loss: torch.Tensor
    z: torch.Tensor
    model_err: torch.Tensor
    ref_err: torch.Tensor


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


def dpo_loss_reference(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                       beta: float) -> DPOLossOutput:
    """PyTorch reference of the fused kernel (fp32 arithmetic whatever the input dtype)."""
    pairs = _check_layout(model_pred, ref_pred, target)
    p = model_pred.float().flatten(1)
    r = ref_pred.detach().float().flatten(1)
    t = target.detach().float().flatten(1)
    if t.shape[0] == pairs:
        t = torch.cat([t, t])
    diff = ((p - r) * (p + r - 2 * t)).mean(1)            # e_theta - e_ref, stable form
    z = -0.5 * beta * (diff[:pairs] - diff[pairs:])
    loss = -F.logsigmoid(z).mean()
    with torch.no_grad():
        model_err = (p.detach() - t).pow(2).mean(1)
        ref_err = (r - t).pow(2).mean(1)
    return DPOLossOutput(loss, z.detach(), model_err, ref_err)


def dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
             beta: float) -> DPOLossOutput:
    """Public entry point: the fused Triton kernel on CUDA tensors, the reference elsewhere."""
    return dpo_loss_reference(model_pred, ref_pred, target, beta)
