"""Losses and rewards as pure functions, each citing the equation it implements.

``dpo_loss`` is Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct
Preference Optimization", CVPR 2024, eq. 14), with the per-sample error taken as the mean
over C, H, W as in the official code and the diffusers examples (beta = 5000 is calibrated to
that mean). Its arithmetic lives in ``kernels.dpo_loss``: a fused Triton kernel on CUDA, the
PyTorch reference elsewhere; both compute the per-row error difference in the stable form
``mean((p_theta - p_ref) * (p_theta + p_ref - 2 * target))`` (docs/method.md, Diffusion-DPO).

``implicit_reward`` is SAIL's self-ranking reward (He et al., ICLR 2026):
``r(x) = -beta/2 * mean_k (e_cur - e_ref)`` over K (t, noise) draws shared by a prompt's
candidates, computed by ``kernels.rank_reward``.
"""
from __future__ import annotations

import torch

from sail.kernels.dpo_loss import DPOLossOutput
from sail.kernels.dpo_loss import dpo_loss as _fused_dpo_loss
from sail.kernels.rank_reward import RankRewardOutput
from sail.kernels.rank_reward import rank_reward as _fused_rank_reward


def dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float, *,
             sft_weight: float = 0.0, hinge_weight: float = 0.0, self_sampling: bool = False,
             dpo_term: bool = True) -> DPOLossOutput:
    """Diffusion-DPO loss, with the optional winner-preserving terms of ``kernels.dpo_loss``,
    or SSPO's self-sampling switch (``self_sampling``: the losers are reference samples).

    model_pred, ref_pred: [2P, C, H, W] laid out [winners; losers]; target: [2P, C, H, W]
    (per sample) or [P, C, H, W] (noise shared by the pair).
    ``z = -beta/2 * ((e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)))``,
    ``loss = mean_pairs(-log sigmoid(z))``; implicit accuracy = mean(z > 0).
    ``hinge_weight`` lam (DPOP): ``z_h = -beta/2 (d_w - d_l + lam max(0, d_w))`` in the loss;
    ``sft_weight`` gamma (DPO + NLL): ``loss += gamma mean_pairs e_theta(w)``.
    ``self_sampling`` (SSPO, Zhang et al. 2410.05255): ``z_s = -beta/2 (d_w + d_l)`` on the pairs
    with d_w > 0 (the reference sample counts as a winner), DPO's ``z`` on the others.
    ``dpo_term=False``: the winner SFT term alone (the winners-only control).
    Returns the loss and per-pair z (the DPO margin), per-row policy and reference errors and the
    per-pair flag d_w > 0 (detached).
    """
    return _fused_dpo_loss(model_pred, ref_pred, target, beta, sft_weight=sft_weight, hinge_weight=hinge_weight,
                           self_sampling=self_sampling, dpo_term=dpo_term)


def implicit_reward(cur_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                    beta: float) -> RankRewardOutput:
    """SAIL implicit reward. cur_pred, ref_pred: [P, N, K, C, H, W]; target: [P, K, C, H, W]
    (shared by the N candidates of a prompt) or [P, N, K, C, H, W]. Returns reward [P, N] and
    the per-draw values [P, N, K]."""
    return _fused_rank_reward(cur_pred, ref_pred, target, beta)


__all__ = ["dpo_loss", "implicit_reward", "DPOLossOutput", "RankRewardOutput"]
