"""Pieces shared by the GEMM-shaped kernels (BN-ReLU-GEMM, the 3x3 implicit GEMM, dgrad): the output tile's
indices, one step of the reduction against a weight matrix read in place, and the statistics epilogue."""

from __future__ import annotations

import triton
import triton.language as tl

from .last_program import finish_statistics


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of this program's output tile (int32, see ``kernels.offsets``), with their edge
    masks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, rows < M, cols < N


@triton.jit
def dot_weight(acc, act, w_ptr, k_offsets, k_mask, n_offsets, col_mask, INTERPRETED: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    """``acc += act @ B`` with ``B[i, j]`` at ``w_ptr + k_offsets[i] + n_offsets[j]``: a weight read where it
    lies (a 1x1 conv's ``(N, K)`` rows, a 3x3 conv's ``(N, C, 3, 3)`` taps), in the weight's dtype; padded
    entries load as zero."""
    w = tl.load(w_ptr + k_offsets[:, None] + n_offsets[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    if INTERPRETED:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
        return tl.dot(act.to(tl.float32), w.to(tl.float32), acc)
    return tl.dot(act.to(w.dtype), w, acc, input_precision=PRECISION)


@triton.jit
def tile_count_mean_m2(values, row_mask):
    """Count (scalar), per-column mean and per-column sum of squared deviations of the valid rows of a
    ``rows x cols`` fp32 tile."""
    count = tl.sum(row_mask.to(tl.float32), axis=0)
    mask = row_mask[:, None]
    mean = tl.sum(tl.where(mask, values, 0.0), axis=0) / tl.maximum(count, 1.0)
    deviation = tl.where(mask, values - mean[None, :], 0.0)
    return count, mean, tl.sum(deviation * deviation, axis=0)


@triton.jit
def tile_statistics(values, row_mask, cols, col_mask, mean_ptr, m2_ptr, counter_ptr, out_ptr, out_stride, eps, M,
                    C, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """Per-column statistics of an output tile's valid rows, as partial row ``program_id(0)``; the last
    programs merge them into the batch mean, variance and rstd (``last_program.finish_statistics``)."""
    _, mean, m2 = tile_count_mean_m2(values.to(tl.float32), row_mask)
    tile = tl.program_id(0)
    row = tile.to(tl.int64) * C
    tl.store(mean_ptr + row + cols, mean, mask=col_mask)
    tl.store(m2_ptr + row + cols, m2, mask=col_mask)
    finish_statistics(mean_ptr, m2_ptr, counter_ptr, out_ptr, out_stride, eps, tile, tl.num_programs(0), BLOCK_M, M,
                      cols, col_mask, C, tl.program_id(1), BLOCK_T)  # fmt: skip
