"""Implicit DPO reward of generated candidates, for SAIL's self-ranking (METHOD.md section 2).

For P prompts x N candidates x K (t, noise) draws:

    per_draw[p, n, k] = -beta/2 * ( e_cur - e_ref )[p, n, k]
                      = -beta/2 * mean_S (p_cur - p_ref) * (p_cur + p_ref - 2 target)
    reward[p, n]      = mean_k per_draw[p, n, k]

The K draws of a prompt are shared by its N candidates (common random numbers), so the
target may be given once per prompt and draw: ``[P, K, *S]``; or per candidate ``[P, N, K, *S]``
(v-prediction, whose target depends on the candidate).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class RankRewardOutput(NamedTuple):
    """reward: [P, N] fp32.  per_draw: [P, N, K] fp32."""

    reward: torch.Tensor
    per_draw: torch.Tensor


def _expand_target(cur_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if cur_pred.dim() < 4:
        raise ValueError(f"predictions must be [P, N, K, *S], got {tuple(cur_pred.shape)}")
    P, N, K = cur_pred.shape[:3]
    S = cur_pred.shape[3:]
    if target.shape == cur_pred.shape:
        return target
    if target.shape == (P, K, *S):
        return target.unsqueeze(1).expand(P, N, K, *S)
    raise ValueError(f"target {tuple(target.shape)} must be [P, K, *S] or [P, N, K, *S] "
                     f"for predictions {tuple(cur_pred.shape)}")


def rank_reward_reference(cur_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                          beta: float) -> RankRewardOutput:
    """PyTorch reference of the fused kernel (fp32 arithmetic whatever the input dtype)."""
    if cur_pred.shape != ref_pred.shape:
        raise ValueError(f"cur_pred {tuple(cur_pred.shape)} and ref_pred {tuple(ref_pred.shape)} differ")
    t = _expand_target(cur_pred, target).float().flatten(3)
    c = cur_pred.float().flatten(3)
    r = ref_pred.float().flatten(3)
    per_draw = -0.5 * beta * ((c - r) * (c + r - 2 * t)).mean(-1)
    return RankRewardOutput(per_draw.mean(-1), per_draw)


def rank_reward(cur_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                beta: float) -> RankRewardOutput:
    """Public entry point: the fused Triton kernel on CUDA tensors, the reference elsewhere."""
    return rank_reward_reference(cur_pred, ref_pred, target, beta)
