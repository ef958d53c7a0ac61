"""Triton kernels and host launcher of the ranking reward (see ``kernels.rank_reward``).

One pass over memory: the shared row kernel (``kernels._triton_rows``) reads cur, ref and target
once and writes per-(row, chunk) partial sums of (c - r)(c + r - 2t); a tiny finalize kernel sums
the chunks, scales by -beta / (2 D) and averages the K draws of every candidate.
"""
import torch
import triton
import triton.language as tl

from sail.kernels._triton_rows import FINALIZE_TILE, RowPlan, chunk_tile, stable_diff_partials


@triton.jit
def _rank_finalize_kernel(
    part_ptr, per_draw_ptr, reward_ptr,
    n_groups, K, n_chunks, scale,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program covers BLOCK_G candidates (groups of K consecutive rows): a 3-D tile
    [candidate, draw, chunk] of the [P*N*K, chunks] partial buffer is summed over chunks
    (per_draw = scale * row sum), then averaged over draws (reward)."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    k = tl.arange(0, BLOCK_K)
    row = g[:, None] * K + k[None, :]                      # [BLOCK_G, BLOCK_K]
    row_mask = (g < n_groups)[:, None] & (k < K)[None, :]
    acc = tl.zeros([BLOCK_G, BLOCK_K, BLOCK_C], dtype=tl.float32)
    for c0 in tl.range(0, n_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, :, None] & (c < n_chunks)[None, None, :]
        acc += tl.load(part_ptr + row[:, :, None] * n_chunks + c[None, None, :], mask=mask, other=0.0)
    per_draw = tl.sum(acc, axis=2) * scale                 # masked draws are exactly 0
    tl.store(per_draw_ptr + row, per_draw, mask=row_mask)
    tl.store(reward_ptr + g, tl.sum(per_draw, axis=1) / K, mask=g < n_groups)


def rank_forward(c2: torch.Tensor, r2: torch.Tensor, t2: torch.Tensor, shape_pnk: tuple[int, int, int],
                 beta: float, plan: RowPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """c2, r2: [P*N*K, D]; t2: [P*N*K, D] or [P*K, D] (shared by the N candidates of a prompt).

    Returns (reward [P, N], per_draw [P, N, K]) in fp32."""
    P, N, K = shape_pnk
    rows, n_cols = c2.shape
    # Row (p, n, k) = p*N*K + n*K + k reads target row p*K + k: group N*K, period K.
    t_group, t_period = (N * K, K) if t2.shape[0] == P * K else (1, 1)
    part = stable_diff_partials(c2, r2, t2, t_group, t_period, False, plan)
    per_draw = torch.empty((P, N, K), device=c2.device, dtype=torch.float32)
    reward = torch.empty((P, N), device=c2.device, dtype=torch.float32)
    block_k = max(2, triton.next_power_of_2(K))
    block_c = chunk_tile(plan.chunks, cap=max(2, FINALIZE_TILE // block_k))
    block_g = max(2, min(triton.next_power_of_2(P * N), FINALIZE_TILE // (block_k * block_c)))
    grid = (triton.cdiv(P * N, block_g),)
    _rank_finalize_kernel[grid](
        part, per_draw, reward, P * N, K, plan.chunks, -0.5 * beta / n_cols,
        BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_C=block_c, num_warps=4)
    return reward, per_draw
