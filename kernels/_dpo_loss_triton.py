"""Triton kernels and host launchers of the fused Diffusion-DPO loss (see ``kernels.dpo_loss``).

Memory passes (the op is bandwidth-bound, so passes are what costs):
  forward   pass 1  reads p_theta, p_ref, target once -> per-(row, chunk) fp32 partial sums
            finalize (one tiny program): per-row sums -> d, e_theta, e_ref, z, loss, and the
            per-row gradient coefficient
  backward  pass 2  reads p_theta, target once, writes grad = coef_row * g * (p_theta - target)

Gradient.  With D the row length, P the number of pairs and g the incoming grad of the loss:

    d_i      = 1/D sum_j (p_ij - r_ij)(p_ij + r_ij - 2 t_ij)      d d_i / d p_ij = 2 (p_ij - t_ij) / D
    z        = -beta/2 (d_w - d_l)                                 d z / d d_w = -beta/2 = -d z / d d_l
    loss     = 1/P sum_pairs softplus(-z)                          d loss / d z = -sigmoid(-z) / P

    d loss / d p_wj = +beta sigmoid(-z) (p_wj - t_wj) / (D P)      (winner row)
    d loss / d p_lj = -beta sigmoid(-z) (p_lj - t_lj) / (D P)      (loser row)

so the backward pass needs one fp32 coefficient per row, ``coef = +-beta sigmoid(-z) / (D P)``.

Winner-preserving terms (``kernels.dpo_loss``) are functions of the same per-row sums, and
d e_theta / d p_j = 2 (p_j - t_j) / D has the shape of d d / d p_j, so they change only the
finalize's coefficients, never the passes:

    hinge (DPOP):  z_h = -beta/2 (d_w - d_l + lam max(0, d_w))
                   coef_w = beta sigmoid(-z_h) (1 + lam [d_w > 0]) / (D P),  coef_l as above
    winner SFT:    loss += gamma mean_pairs e_theta(w),  coef_w += 2 gamma / (D P)
    SSPO switch:   q = -1 if d_w > 0 else 1,  z_s = -beta/2 (d_w - q d_l)
                   coef_w as above with z_s,  coef_l = -q beta sigmoid(-z_s) / (D P)
    no DPO term:   loss = gamma mean_pairs e_theta(w),  coef_w = 2 gamma / (D P),  coef_l = 0
"""
import torch
import triton
import triton.language as tl

from sail.kernels._triton_rows import (FINALIZE_TILE, RowPlan, chunk_tile, row_totals,
                                       stable_diff_partials, target_row)


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for tiny x without libdevice (Goldberg): when 1 + x rounds to u,
    # log(u) * x / (u - 1) cancels the rounding error of u; u == 1 means log1p(x) == x to fp32.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def _softplus(x):
    # softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|): never overflows.
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _store_row_means(dst_ptr, part_ptr, w, l, mask, n_chunks, inv_d, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    # dst[row] = (sum over chunks of part[row, :]) / D for the winner rows w and loser rows l.
    tl.store(dst_ptr + w, row_totals(part_ptr, w, mask, n_chunks, BLOCK_P, BLOCK_C) * inv_d, mask=mask)
    tl.store(dst_ptr + l, row_totals(part_ptr, l, mask, n_chunks, BLOCK_P, BLOCK_C) * inv_d, mask=mask)


@triton.jit
def _dpo_finalize_kernel(
    part_ptr, z_ptr, model_err_ptr, ref_err_ptr, worse_ptr, coef_ptr, loss_ptr,
    pairs, n_chunks, inv_d, half_beta, sft_weight, hinge_weight,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SFT: tl.constexpr, HAS_HINGE: tl.constexpr,
    HAS_SWITCH: tl.constexpr, HAS_DPO: tl.constexpr = True,
):
    """One program: reduce the [3, 2P, chunks] partial sums and apply the per-pair math.

    A single program keeps the loss a deterministic sum; P is at most a few thousand, so the
    loop over pair tiles is short."""
    plane = 2 * pairs * n_chunks
    loss_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in tl.range(0, pairs, BLOCK_P):
        w = p0 + tl.arange(0, BLOCK_P)     # winner rows
        m = w < pairs
        l = w + pairs                      # their losers
        d_w = row_totals(part_ptr, w, m, n_chunks, BLOCK_P, BLOCK_C) * inv_d
        d_l = row_totals(part_ptr, l, m, n_chunks, BLOCK_P, BLOCK_C) * inv_d
        z = -half_beta * (d_w - d_l)                   # the DPO margin (logged as z)
        z_loss = z
        q = 1.0                                        # SSPO: -1 where x_ref counts as a winner
        if HAS_HINGE:
            z_loss = -half_beta * (d_w - d_l + hinge_weight * tl.maximum(d_w, 0.0))
        if HAS_SWITCH:
            q = tl.where(d_w > 0.0, -1.0, 1.0)
            z_loss = -half_beta * (d_w - q * d_l)
        # coef = beta * sigmoid(-z) / (D * P), + for the winner, - for the loser (module doc).
        coef = 2.0 * half_beta * tl.sigmoid(-z_loss) * inv_d / pairs
        if HAS_DPO:
            loss_acc += tl.where(m, _softplus(-z_loss), 0.0)    # -log sigmoid(z) = softplus(-z)
        else:
            coef = coef * 0.0
        coef_w = coef
        if HAS_HINGE:
            coef_w = coef * (1.0 + tl.where(d_w > 0.0, hinge_weight, 0.0))
        if HAS_SFT:
            e_w = row_totals(part_ptr + plane, w, m, n_chunks, BLOCK_P, BLOCK_C) * inv_d
            loss_acc += tl.where(m, sft_weight * e_w, 0.0)
            coef_w += 2.0 * sft_weight * inv_d / pairs
        tl.store(z_ptr + w, z, mask=m)
        tl.store(worse_ptr + w, tl.where(d_w > 0.0, 1.0, 0.0), mask=m)
        tl.store(coef_ptr + w, coef_w, mask=m)
        tl.store(coef_ptr + l, -q * coef, mask=m)
        # e_theta and e_ref of winners and losers, reported for logging.
        _store_row_means(model_err_ptr, part_ptr + plane, w, l, m, n_chunks, inv_d, BLOCK_P, BLOCK_C)
        _store_row_means(ref_err_ptr, part_ptr + 2 * plane, w, l, m, n_chunks, inv_d, BLOCK_P, BLOCK_C)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / pairs)


@triton.jit
def _dpo_grad_kernel(
    p_ptr, t_ptr, coef_ptr, gout_ptr, grad_ptr,
    n_cols, chunk_len, n_chunks, t_group, t_period, n_programs,
    BLOCK: tl.constexpr,
):
    """grad[row, j] = coef[row] * g * (p[row, j] - t[t_row, j]), stored in grad's dtype."""
    # Walk the (row, chunk) tiles in the reverse order of the forward pass: the tiles the
    # forward read last are the likeliest to still sit in L2.
    pid = n_programs - 1 - tl.program_id(0)
    row = pid // n_chunks
    chunk = pid % n_chunks
    t_row = target_row(row, t_group, t_period)
    # g (the incoming grad of the loss) is read from device memory: no host sync, no extra pass.
    c = tl.load(coef_ptr + row) * tl.load(gout_ptr).to(tl.float32)
    p_row = p_ptr + row.to(tl.int64) * n_cols
    g_row = grad_ptr + row.to(tl.int64) * n_cols
    t_row_ptr = t_ptr + t_row.to(tl.int64) * n_cols
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, n_cols)
    for off in tl.range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < end
        p = tl.load(p_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        t = tl.load(t_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(g_row + cols, (c * (p - t)).to(grad_ptr.dtype.element_ty), mask=mask)


def dpo_forward(p2: torch.Tensor, r2: torch.Tensor, t2: torch.Tensor, beta: float, plan: RowPlan,
                sft_weight: float = 0.0, hinge_weight: float = 0.0, self_sampling: bool = False, dpo_term: bool = True):
    """Pass 1 + finalize.  p2, r2: [2P, D]; t2: [2P, D] or [P, D] (shared by a pair);
    ``sft_weight`` (gamma) and ``hinge_weight`` (lam): the winner-preserving terms, 0 = off;
    ``self_sampling``: SSPO's switch; ``dpo_term`` False: the winner SFT term alone.

    Returns (loss [], z [P], model_err [2P], ref_err [2P], winner_worse [P], coef [2P]), all fp32."""
    rows, n_cols = p2.shape
    pairs = rows // 2
    # A [P, D] target is shared by row i and row i + P: t_row = i mod P (group 2P, period P).
    t_group, t_period = (rows, pairs) if t2.shape[0] == pairs else (1, 1)
    part = stable_diff_partials(p2, r2, t2, t_group, t_period, True, plan)
    dev = p2.device
    z = torch.empty(pairs, device=dev, dtype=torch.float32)
    model_err = torch.empty(rows, device=dev, dtype=torch.float32)
    ref_err = torch.empty(rows, device=dev, dtype=torch.float32)
    worse = torch.empty(pairs, device=dev, dtype=torch.float32)
    coef = torch.empty(rows, device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    block_c = chunk_tile(plan.chunks)
    block_p = max(2, min(triton.next_power_of_2(pairs), FINALIZE_TILE // block_c))
    _dpo_finalize_kernel[(1,)](
        part, z, model_err, ref_err, worse, coef, loss, pairs, plan.chunks, 1.0 / n_cols, 0.5 * beta,
        float(sft_weight), float(hinge_weight), BLOCK_P=block_p, BLOCK_C=block_c,
        HAS_SFT=sft_weight != 0, HAS_HINGE=hinge_weight != 0, HAS_SWITCH=bool(self_sampling), HAS_DPO=bool(dpo_term), num_warps=4)
    return loss, z, model_err, ref_err, worse, coef


def dpo_backward(p2: torch.Tensor, t2: torch.Tensor, coef: torch.Tensor, grad_loss: torch.Tensor,
                 plan: RowPlan) -> torch.Tensor:
    """Pass 2: gradient w.r.t. the model prediction, [2P, D] in p2's dtype."""
    rows, n_cols = p2.shape
    t_group, t_period = (rows, rows // 2) if t2.shape[0] == rows // 2 else (1, 1)
    grad = torch.empty_like(p2)
    n_programs = rows * plan.chunks
    _dpo_grad_kernel[(n_programs,)](
        p2, t2, coef, grad_loss, grad, n_cols, plan.chunk_len, plan.chunks, t_group, t_period,
        n_programs, BLOCK=plan.block, num_warps=plan.num_warps)
    return grad
