"""Per-column batch statistics of a row-major ``M x C`` matrix (a column range of a block buffer).

Each program reduces ``ROW_TILES`` tiles of ``BLOCK_M`` rows of a ``BLOCK_C``-column strip and merges
them on the fly (Chan et al.'s pairwise update of count, mean and M2), then writes one partial per
strip. ``merge_partials`` combines the partials the same way on the host side. Unlike
``E[x^2] - E[x]^2`` in fp32 this keeps full precision for a column whose mean is large against its
spread, over millions of rows. The GEMM and conv kernels emit the same partials from their epilogues.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import bucket, check_kernel_tensors, check_rows, row_bucket, smallest, tuned, unit_columns
from .offsets import row_offsets


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
def store_partials(mean_ptr, m2_ptr, count_ptr, tile, cols, col_mask, count, mean, m2, stride):
    """Write one tile's partial statistics as row ``tile`` of the ``(tiles, C)`` partial arrays."""
    row = tile.to(tl.int64) * stride
    tl.store(mean_ptr + row + cols, mean, mask=col_mask)
    tl.store(m2_ptr + row + cols, m2, mask=col_mask)
    tl.store(count_ptr + tile, count)


# Elementwise reduction, no matrix product: 63-128 registers per thread, at most 4 KB of shared memory.
# Rows per program = BLOCK_M * ROW_TILES; the first configuration is the interpreter's.
_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_C": 32, "ROW_TILES": 4}, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_C": 64, "ROW_TILES": 8}, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_C": 128, "ROW_TILES": 16}, num_warps=8),
]
_MIN_ROWS_PER_PROGRAM = smallest(_CONFIGS, "BLOCK_M", "ROW_TILES")


@tuned(
    _CONFIGS,
    key=["C_BUCKET", "M_BUCKET"],
    reset_to_zero=["mean_ptr", "m2_ptr", "count_ptr"],
)
@triton.jit
def _column_stats_kernel(
    x_ptr, mean_ptr, m2_ptr, count_ptr, M, C, stride_x, C_BUCKET, M_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROW_TILES: tl.constexpr,
):  # fmt: skip
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = tl.zeros((), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for t in range(ROW_TILES):
        rows = (pid_m * ROW_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + row_offsets(rows, stride_x)[:, None] + cols[None, :], mask, other=0.0)
        t_count, t_mean, t_m2 = tile_count_mean_m2(x.to(tl.float32), row_mask)
        total = count + t_count
        delta = t_mean - mean
        weight = t_count / tl.maximum(total, 1.0)
        mean += delta * weight
        m2 += t_m2 + delta * delta * count * weight
        count = total
    store_partials(mean_ptr, m2_ptr, count_ptr, pid_m, cols, col_mask, count, mean, m2, C)


def empty_partials(tiles: int, columns: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Zeroed ``(tiles, columns)`` mean and M2 partials and ``tiles`` counts (tiles a config leaves
    unwritten count zero in the merge)."""
    return (
        torch.zeros((tiles, columns), dtype=torch.float32, device=device),
        torch.zeros((tiles, columns), dtype=torch.float32, device=device),
        torch.zeros(tiles, dtype=torch.float32, device=device),
    )


def merge_partials(mean: Tensor, m2: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean per column from per-tile partials (rows with count 0 are ignored)."""
    total = count.sum()
    weights = (count / total.clamp(min=1.0))[:, None]
    merged_mean = (mean * weights).sum(0)
    m2_total = m2.sum(0) + (weights * (mean - merged_mean).square()).sum(0) * total
    return m2_total / total.clamp(min=1.0), merged_mean


def column_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean (float32) of each column of an ``M x C`` matrix with unit column stride
    (a column slice of a channels_last buffer, any row stride)."""
    check_kernel_tensors(x)
    m, c = x.shape
    check_rows(m, "column_stats")
    if not unit_columns(x):
        raise ValueError(f"column_stats: x must have unit column stride, got strides {x.stride()}")
    if m == 0:
        return torch.zeros(2, c, dtype=torch.float32, device=x.device).unbind(0)
    tiles = triton.cdiv(m, _MIN_ROWS_PER_PROGRAM)  # the most partial rows any configuration writes
    mean, m2, count = empty_partials(tiles, c, x.device)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_TILES"]), triton.cdiv(c, meta["BLOCK_C"])

    _column_stats_kernel[grid](x, mean, m2, count, m, c, x.stride(0), bucket(c), row_bucket(m))
    return merge_partials(mean, m2, count)


def column_stats_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """What ``column_stats`` computes, with PyTorch ops (for the tests)."""
    var, mean = torch.var_mean(x.double(), dim=0, correction=0)
    return var.float(), mean.float()
