"""Pieces shared by the GEMM-shaped kernels (BN-ReLU-GEMM, the 3x3 implicit GEMM): the output tile's
indices, one step of the reduction against a K x N weight matrix, and the statistics epilogue."""

from __future__ import annotations

import triton
import triton.language as tl

from .stats import store_partials, tile_count_mean_m2


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of this program's output tile (int32, see ``kernels.offsets``), with their edge
    masks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, rows < M, cols < N


@triton.jit
def dot_weight_rows(
    acc, act, w_ptr, w_rows, k_mask, cols, col_mask, N, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr
):
    """``acc += act @ W[w_rows, cols]`` for a row-major ``K x N`` weight matrix; padded rows load as zero."""
    w = tl.load(w_ptr + (w_rows * N)[:, None] + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    if INTERPRETED:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
        return tl.dot(act.to(tl.float32), w.to(tl.float32), acc)
    return tl.dot(act.to(w.dtype), w, acc, input_precision=PRECISION)


@triton.jit
def store_tile_statistics(values, row_mask, cols, col_mask, mean_ptr, m2_ptr, count_ptr, N):
    """Per-column count/mean/M2 partials of an output tile's valid rows, as row ``program_id(0)``."""
    count, mean, m2 = tile_count_mean_m2(values.to(tl.float32), row_mask)
    store_partials(mean_ptr, m2_ptr, count_ptr, tl.program_id(0), cols, col_mask, count, mean, m2, N)
