"""Per-column batch statistics of a row-major ``M x C`` matrix (a column range of a block buffer).

Each program reduces ``ROW_TILES`` tiles of ``BLOCK_M`` rows of a ``BLOCK_C``-column strip and merges
them on the fly (Chan et al.'s pairwise update of count, mean and M2), then writes one partial per
strip. ``merge_partials`` combines the partials the same way, by a second kernel. Unlike
``E[x^2] - E[x]^2`` in fp32 this keeps full precision for a column whose mean is large against its
spread, over millions of rows. The GEMM and conv kernels emit the same partials from their epilogues.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import (
    Moved,
    bucket,
    check_kernel_tensors,
    check_rows,
    row_bucket,
    smallest,
    tuned,
    uninitialised,
    unit_columns,
)
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
def chan_update(count, mean, m2, t_count, t_mean, t_m2):
    """Running (count, mean, M2) merged with a tile's (Chan et al.'s pairwise update; empty tiles leave it)."""
    total = count + t_count
    delta = t_mean - mean
    weight = t_count / tl.maximum(total, 1.0)
    return total, mean + delta * weight, m2 + t_m2 + delta * delta * count * weight


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
        count, mean, m2 = chan_update(count, mean, m2, t_count, t_mean, t_m2)
    store_partials(mean_ptr, m2_ptr, count_ptr, pid_m, cols, col_mask, count, mean, m2, C)


def empty_partials(tiles: int, columns: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(tiles, columns)`` mean and M2 partials and ``tiles`` counts, uninitialised: room for the most
    tiles any configuration writes; ``written`` keeps the rows the launch wrote (no zero-fill)."""
    mean, m2 = uninitialised(2, tiles, columns, device=device)
    return mean, m2, uninitialised(tiles, device=device)


def written(partials: tuple[Tensor, ...], tiles: int) -> tuple[Tensor, ...]:
    """The first ``tiles`` rows of each partial array: those the launch wrote (its grid's row tiles under
    the configuration it ran with, ``Launcher.last_config``)."""
    return tuple(p[:tiles] for p in partials)


def no_partials(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Pointers for a launch that writes no statistics (``STATS=False``): one element, never zeroed, no
    launch."""
    unused = torch.empty(1, dtype=torch.float32, device=device)
    return unused, unused, unused


# The merge of the partials: one program per strip of columns walks every partial row. Tiny work (a few
# hundred KB), one launch instead of about fourteen PyTorch operators. The first configuration is the
# interpreter's; the second, Hopper's: 32 partial rows of 128 columns a step, fp32, no matrix product
# (on sm_90: 64 rows a step took 207 registers per thread; 32 rows take 112, 114 in triton 3.6; no spills).
_MERGE_CONFIGS = [
    triton.Config({"BLOCK_T": 16, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_T": 32, "BLOCK_C": 128}, num_warps=4),
]


@tuned(_MERGE_CONFIGS[1:], key=[], interpret=_MERGE_CONFIGS[0], name="merge_partials")
@triton.jit
def _merge_partials_kernel(
    mean_ptr, m2_ptr, count_ptr, var_out_ptr, mean_out_ptr, T, C,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = tl.zeros((), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        tile_mask = tiles < T
        t_counts = tl.load(count_ptr + tiles, mask=tile_mask, other=0.0)
        offsets = tiles.to(tl.int64)[:, None] * C + cols[None, :]
        mask = tile_mask[:, None] & col_mask[None, :]
        t_means = tl.load(mean_ptr + offsets, mask=mask, other=0.0)
        t_m2s = tl.load(m2_ptr + offsets, mask=mask, other=0.0)
        # this step's rows as one partial (the host merge's formula), then Chan's update, as column_stats
        t_count = tl.sum(t_counts, axis=0)
        weights = t_counts / tl.maximum(t_count, 1.0)
        t_mean = tl.sum(t_means * weights[:, None], axis=0)
        deviation = t_means - t_mean[None, :]
        t_m2 = tl.sum(t_m2s + deviation * deviation * t_counts[:, None], axis=0)
        count, mean, m2 = chan_update(count, mean, m2, t_count, t_mean, t_m2)
    tl.store(var_out_ptr + cols, m2 / tl.maximum(count, 1.0), mask=col_mask)
    tl.store(mean_out_ptr + cols, mean, mask=col_mask)


@_merge_partials_kernel.planned
def _merge_partials_plan(args: dict, meta: dict) -> Moved:
    """The partials once (the counts once per strip of columns), the variance and mean written."""
    t, c = args["T"], args["C"]
    strips = triton.cdiv(c, meta["BLOCK_C"])
    return Moved(t * (2 * c + strips) * 4, 2 * c * 4, 0, t * (strips - 1) * 4)


def merge_partials(mean: Tensor, m2: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean per column from ``(tiles, C)`` partials and ``tiles`` counts (rows with
    count 0 are ignored), by one kernel launch (``merge_partials_reference``: the same with PyTorch ops)."""
    tiles, c = mean.shape
    # two allocations, not views of one: a saved mean must not keep the variance's memory alive
    var_out, mean_out = (torch.empty(c, dtype=torch.float32, device=mean.device) for _ in range(2))
    if c > 0:
        _merge_partials_kernel[lambda meta: (triton.cdiv(c, meta["BLOCK_C"]),)](
            mean, m2, count, var_out, mean_out, tiles, c
        )
    return var_out, mean_out


def merge_partials_reference(mean: Tensor, m2: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """What ``merge_partials`` computes, with PyTorch ops (for the tests)."""
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
    partials = empty_partials(tiles, c, x.device)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_TILES"]), triton.cdiv(c, meta["BLOCK_C"])

    _column_stats_kernel[grid](x, *partials, m, c, x.stride(0), bucket(c), row_bucket(m))
    return merge_partials(*written(partials, grid(_column_stats_kernel.last_config.kwargs)[0]))


@_column_stats_kernel.planned
def _column_stats_plan(args: dict, meta: dict) -> Moved:
    """Every element once; one count, mean and M2 partial per column and program."""
    m, c = args["M"], args["C"]
    programs = triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_TILES"])
    return Moved(m * c * args["x_ptr"].element_size(), programs * (2 * c + triton.cdiv(c, meta["BLOCK_C"])) * 4)


def column_stats_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """What ``column_stats`` computes, with PyTorch ops (for the tests)."""
    var, mean = torch.var_mean(x.double(), dim=0, correction=0)
    return var.float(), mean.float()
