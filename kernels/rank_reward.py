"""Implicit DPO reward of generated candidates, for SAIL's self-ranking (docs/method.md, SAIL).

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

try:  # Triton is optional: without it every call takes the PyTorch reference.
    from sail.kernels import _rank_reward_triton as _triton_impl
    from sail.kernels._triton_rows import plan_rows as _plan_rows
except ImportError:  # pragma: no cover - exercised only on installs without triton
    _triton_impl = None


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


@torch.no_grad()
def rank_reward_triton(cur_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                       beta: float, *, block: int | None = None,
                       programs: int | None = None) -> RankRewardOutput:
    """Fused Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``), one pass over memory.

    cur_pred, ref_pred: ``[P, N, K, *S]`` any float dtype; target: ``[P, K, *S]`` (read by the
    N candidates of a prompt, never expanded) or ``[P, N, K, *S]``.

        per_draw[p, n, k] = -beta/2 * mean_S (c - r)(c + r - 2 t)      (fp32 arithmetic)
        reward[p, n]      = mean_k per_draw[p, n, k]

    Returns ``RankRewardOutput(reward [P, N], per_draw [P, N, K])`` fp32, no autograd (ranking
    is a no-grad step).  ``block`` / ``programs`` override the launch heuristics, for tests.
    """
    if _triton_impl is None:
        raise RuntimeError("rank_reward_triton needs triton, which is not installed")
    if cur_pred.shape != ref_pred.shape:
        raise ValueError(f"cur_pred {tuple(cur_pred.shape)} and ref_pred {tuple(ref_pred.shape)} differ")
    _expand_target(cur_pred, target)                      # validates the target layout only
    P, N, K = cur_pred.shape[:3]
    rows = P * N * K
    c2 = cur_pred.detach().contiguous().view(rows, -1)
    r2 = ref_pred.detach().contiguous().view(rows, -1)
    t2 = target.detach().contiguous().view(-1, c2.shape[1])
    if c2.shape[1] == 0:
        raise ValueError(f"empty rows: cur_pred {tuple(cur_pred.shape)}")
    plan = _plan_rows(rows, c2.shape[1], c2.device, block, programs)
    return RankRewardOutput(*_triton_impl.rank_forward(c2, r2, t2, (P, N, K), float(beta), plan))


def rank_reward(cur_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                beta: float) -> RankRewardOutput:
    """Public entry point: the fused Triton kernel on CUDA tensors, the reference elsewhere.

    Shapes and equation as in :func:`rank_reward_triton` / the module docstring.
    """
    on_cuda = cur_pred.is_cuda and ref_pred.is_cuda and target.is_cuda
    if on_cuda and _triton_impl is not None:
        return rank_reward_triton(cur_pred, ref_pred, target, beta)
    return rank_reward_reference(cur_pred, ref_pred, target, beta)
