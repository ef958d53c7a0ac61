"""Shared Triton pieces of the row-wise kernels (DPO loss, ranking reward).

Both ops reduce rows of a few thousand to a few hundred thousand elements to a handful of fp32
numbers per row.  The batch can be as small as 2 rows, so one program per row would leave most of
an H100's 132 SMs idle.  Every row is therefore SPLIT into chunks: the grid is ``rows x chunks``
programs, each program loops over its chunk in tiles of ``BLOCK`` elements and writes its partial
sums to a small fp32 buffer ``[n_sums, rows, chunks]``; a tiny second kernel reduces that buffer.
The buffer is written in full (no atomics), so results are deterministic run to run.

Target rows may be shared by several prediction rows.  Prediction row ``i`` reads target row

    t_row(i) = (i // group) * period + i % period

which covers the three layouts without materialising an expanded target:
  per-sample target            group = 1,      period = 1   -> t_row = i
  DPO, one target per pair     group = 2P,     period = P   -> t_row = i mod P
  ranking, one per (prompt,k)  group = N * K,  period = K   -> t_row = prompt * K + k

This module needs triton; the public modules import it lazily and fall back to PyTorch.
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# GPU: 1024 elements x 4 warps = 8 elements per thread -> 16-byte vector loads for 16-bit dtypes.
_GPU_BLOCK = 1024
# Enough resident programs per SM to keep loads in flight on a bandwidth-bound kernel.
_GPU_PROGRAMS_PER_SM = 8
# Interpreter (CPU): every program costs Python overhead, so use few programs and big tiles.
_INTERPRETER_BLOCK = 4096
# Elements of the 2-D/3-D tile of the one-shot finalize kernels: at 4 warps, 1024 keeps them free
# of register spills on sm_90 (checked with ptxas -v; 4096 spilled).
FINALIZE_TILE = 1024


class RowPlan(NamedTuple):
    """How rows are split: ``chunks`` programs per row, each covering ``chunk_len`` columns
    (a multiple of ``block``, so only the row end needs a mask)."""

    block: int
    chunks: int
    chunk_len: int
    num_warps: int


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_rows(rows: int, n_cols: int, device: torch.device, block: int | None = None,
              programs: int | None = None) -> RowPlan:
    """Choose the tile size and the number of chunks per row.

    ``block`` and ``programs`` (the wanted total number of programs) override the defaults;
    tests use them to force several chunks per row and ragged tiles under the interpreter.
    """
    if n_cols <= 0 or rows <= 0:
        raise ValueError(f"need at least one row and one column, got {rows} x {n_cols}")
    on_gpu = device.type == "cuda"
    if block is None:
        cap = _GPU_BLOCK if on_gpu else _INTERPRETER_BLOCK
        block = min(cap, max(16, triton.next_power_of_2(n_cols)))
    if programs is None:
        programs = _GPU_PROGRAMS_PER_SM * _sm_count(device.index or 0) if on_gpu else 1
    blocks_per_row = triton.cdiv(n_cols, block)
    chunks = min(blocks_per_row, max(1, triton.cdiv(programs, rows)))
    blocks_per_chunk = triton.cdiv(blocks_per_row, chunks)
    chunks = triton.cdiv(blocks_per_row, blocks_per_chunk)   # drop chunks that would be empty
    num_warps = max(1, min(4, block // 256))
    return RowPlan(block, chunks, blocks_per_chunk * block, num_warps)


@triton.jit
def target_row(row, t_group, t_period):
    # See the module docstring: maps a prediction row to the target row it shares.
    return (row // t_group) * t_period + row % t_period


@triton.jit
def _stable_diff_partials_kernel(
    p_ptr, r_ptr, t_ptr, out_ptr,
    rows, n_cols, chunk_len, n_chunks, t_group, t_period,
    BLOCK: tl.constexpr, WITH_ERRORS: tl.constexpr,
):
    """Program (row, chunk) writes, over its columns, the fp32 sums of
         (p - r) * ((p - t) + (r - t))        (= (p-t)^2 - (r-t)^2 without cancellation)
    and, if WITH_ERRORS, of (p - t)^2 and (r - t)^2, into out[k, row, chunk]."""
    pid = tl.program_id(0)
    row = pid // n_chunks
    chunk = pid % n_chunks
    t_row = target_row(row, t_group, t_period)
    # int64 row offsets: rows x columns may exceed 2^31 elements.
    p_row = p_ptr + row.to(tl.int64) * n_cols
    r_row = r_ptr + row.to(tl.int64) * n_cols
    t_row_ptr = t_ptr + t_row.to(tl.int64) * n_cols
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, n_cols)
    # Vector accumulators, summed once at the end: each lane adds only chunk_len / BLOCK terms,
    # and the final tree reduction keeps the fp32 rounding error small.
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK], dtype=tl.float32)
    for off in tl.range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < end
        # Upcast right after the load: every product and sum below is fp32 (bf16 would lose the
        # small difference between policy and reference).
        p = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
        # The reference prediction is read exactly once by every op: do not let it push the
        # model prediction and target (re-read by the backward pass) out of L2.
        r = tl.load(r_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        t = tl.load(t_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dp = p - t
        dr = r - t
        acc_d += (p - r) * (dp + dr)
        if WITH_ERRORS:
            acc_m += dp * dp
            acc_r += dr * dr
    out = out_ptr + row * n_chunks + chunk
    tl.store(out, tl.sum(acc_d, axis=0))
    if WITH_ERRORS:
        plane = rows * n_chunks
        tl.store(out + plane, tl.sum(acc_m, axis=0))
        tl.store(out + 2 * plane, tl.sum(acc_r, axis=0))


def stable_diff_partials(p2: torch.Tensor, r2: torch.Tensor, t2: torch.Tensor, t_group: int,
                         t_period: int, with_errors: bool, plan: RowPlan) -> torch.Tensor:
    """Pass over memory number one.

    p2, r2: [rows, D] contiguous, any float dtype.  t2: [T, D] contiguous (T rows, shared as
    described in the module docstring).  Returns fp32 partial sums ``[3 or 1, rows, chunks]``:
    sum (p-r)(p+r-2t), and with ``with_errors`` also sum (p-t)^2 and sum (r-t)^2.
    """
    rows, n_cols = p2.shape
    out = torch.empty((3 if with_errors else 1, rows, plan.chunks), device=p2.device,
                      dtype=torch.float32)
    _stable_diff_partials_kernel[(rows * plan.chunks,)](
        p2, r2, t2, out, rows, n_cols, plan.chunk_len, plan.chunks, t_group, t_period,
        BLOCK=plan.block, WITH_ERRORS=with_errors, num_warps=plan.num_warps)
    return out


@triton.jit
def row_totals(part_ptr, row_idx, row_mask, n_chunks, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """Sum a [rows, n_chunks] fp32 partial buffer over its chunks for the rows ``row_idx``."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in tl.range(0, n_chunks, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_chunks)[None, :]
        acc += tl.load(part_ptr + row_idx[:, None] * n_chunks + cols[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=1)


def chunk_tile(n_chunks: int, cap: int = 64) -> int:
    """Power-of-two tile width over the chunk axis of a partial buffer (>= 2 for portability)."""
    return max(2, min(cap, triton.next_power_of_2(n_chunks)))
