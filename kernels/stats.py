"""Per-column batch statistics of a row-major ``M x C`` matrix (a column range of a block buffer).

Each program reduces ``ROW_TILES`` tiles of ``BLOCK_M`` rows of a ``BLOCK_C``-column strip and merges them on
the fly (Chan et al.'s pairwise update of count, mean and M2), writes one partial per strip, and the last
programs merge the partials (``last_program.finish_statistics``): one launch gives the columns' mean,
``1 / sqrt(var + eps)`` and biased variance. Unlike ``E[x^2] - E[x]^2`` in fp32 this keeps full precision for a
column whose mean is large against its spread, over millions of rows. The GEMM and conv kernels finish
their epilogues' statistics the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .last_program import CounterPool, chan_update, counters_needed, finish_statistics, take_counters
from .launch import (
    Moved,
    bucket,
    cdiv,
    check_kernel_tensors,
    check_rows,
    row_bucket,
    smallest,
    tuned,
    uninitialised,
    unit_columns,
)
from .offsets import row_offsets
from .tiles import tile_count_mean_m2

# The merge's step: partial rows per iteration of the last programs' loops.
MERGE_ROWS = 32

# Elementwise reduction, no matrix product. Rows per program = BLOCK_M * ROW_TILES; the first configuration
# is the interpreter's.
_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_C": 32, "ROW_TILES": 4}, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_C": 64, "ROW_TILES": 8}, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_C": 128, "ROW_TILES": 16}, num_warps=8),
]
_MIN_ROWS_PER_PROGRAM = smallest(_CONFIGS, "BLOCK_M", "ROW_TILES")
_MIN_BLOCK_C = smallest(_CONFIGS, "BLOCK_C")


@tuned(_CONFIGS, key=["C_BUCKET", "M_BUCKET"])
@triton.jit
def _column_stats_kernel(
    x_ptr, mean_ptr, m2_ptr, counter_ptr, out_ptr, out_stride, eps, M, C, stride_x, C_BUCKET, M_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROW_TILES: tl.constexpr, BLOCK_T: tl.constexpr,
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
    row = pid_m.to(tl.int64) * C
    tl.store(mean_ptr + row + cols, mean, mask=col_mask)
    tl.store(m2_ptr + row + cols, m2, mask=col_mask)
    finish_statistics(mean_ptr, m2_ptr, counter_ptr, out_ptr, out_stride, eps, pid_m, tl.num_programs(0),
                      BLOCK_M * ROW_TILES, M, cols, col_mask, C, pid_c, BLOCK_T)  # fmt: skip


def empty_partials(tiles: int, columns: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(tiles, columns)`` mean and M2 partials, uninitialised: room for the most tiles any configuration
    writes (the last programs read only the rows their launch wrote)."""
    mean, m2 = uninitialised(2, tiles, columns, device=device)
    return mean, m2


def no_partials(device: torch.device) -> tuple[Tensor, Tensor]:
    """Pointers for a launch that writes no statistics: one element, never zeroed, no launch."""
    unused = torch.empty(1, dtype=torch.float32, device=device)
    return unused, unused


def statistics_rows(columns: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """An uninitialised ``(3, columns)`` array for a launch's statistics: rows mean, rstd, biased variance."""
    return torch.empty((3, columns), dtype=dtype, device=device)


def check_statistics_out(out: Tensor, columns: int, what: str) -> None:
    if out.dtype != torch.float32 or out.shape != (3, columns) or out.stride(1) != 1:
        raise ValueError(
            f"{what}: statistics out must be a float32 (3, {columns}) array with unit column stride "
            f"(rows mean, rstd, var), got {out.dtype} {tuple(out.shape)}"
        )


def empty_batch_statistics(out: Tensor, eps: float) -> Tensor:
    """An empty batch's statistics, as PyTorch's BatchNorm leaves them: mean and variance zero, nothing
    normalised (rstd of a zero variance)."""
    out[0].zero_()
    out[1].fill_(float(eps) ** -0.5)
    out[2].zero_()
    return out


def column_stats_counters(m: int, c: int) -> int:
    """The arrival counters ``column_stats`` uses for an ``m x c`` matrix (``last_program.CounterPool``)."""
    return counters_needed(cdiv(m, _MIN_ROWS_PER_PROGRAM), cdiv(c, _MIN_BLOCK_C))


def column_stats(x: Tensor, eps: float = 0.0, out: Tensor | None = None, pool: CounterPool | None = None) -> Tensor:
    """The ``(3, C)`` float32 mean, ``1 / sqrt(var + eps)`` and biased variance of each column of an ``M x C``
    matrix with unit column stride (a column slice of a channels_last buffer, any row stride), written into
    ``out`` when given (a view, e.g. a dense block's statistics for a column range). One launch."""
    check_kernel_tensors(x)
    m, c = x.shape
    check_rows(m, "column_stats")
    if not unit_columns(x):
        raise ValueError(f"column_stats: x must have unit column stride, got strides {x.stride()}")
    out = statistics_rows(c, device=x.device) if out is None else out
    check_statistics_out(out, c, "column_stats")
    if m == 0 or c == 0:
        return empty_batch_statistics(out, eps)
    tiles = cdiv(m, _MIN_ROWS_PER_PROGRAM)  # the most partial rows any configuration writes
    partials = empty_partials(tiles, c, x.device)
    counter = take_counters(pool, column_stats_counters(m, c), x.device)

    def grid(meta):
        return cdiv(m, meta["BLOCK_M"] * meta["ROW_TILES"]), cdiv(c, meta["BLOCK_C"])

    _column_stats_kernel[grid](
        x, *partials, counter, out, out.stride(0), float(eps), m, c, x.stride(0), bucket(c), row_bucket(m),
        BLOCK_T=MERGE_ROWS,
    )  # fmt: skip
    return out


@_column_stats_kernel.planned
def _column_stats_plan(args: dict, meta: dict) -> Moved:
    """Every element once; one mean and M2 partial per column and program, read back by the merging
    programs (two levels); the three statistics written."""
    m, c = args["M"], args["C"]
    return Moved(m * c * args["x_ptr"].element_size(), 0) + partials_moved(
        cdiv(m, meta["BLOCK_M"] * meta["ROW_TILES"]), c
    )


def partials_moved(tiles: int, columns: int, arrays: int = 2, finals: int = 3) -> Moved:
    """What a launch's ``tiles`` partial rows of ``arrays`` float32 ``columns``-wide arrays cost: written
    once, read by the first-level merges, the groups' rows written and read again by the last program,
    ``finals`` vectors written; arrival counters read and written (``last_program``)."""
    from .last_program import GROUP

    groups = cdiv(tiles, GROUP)
    row = arrays * columns * 4
    written = tiles * row + groups * row + finals * columns * 4
    read = tiles * row + groups * row
    counters = (tiles + groups) * 4 * 2
    return Moved(read + counters, written + counters, 0, groups * row)


def column_stats_reference(x: Tensor, eps: float = 0.0) -> Tensor:
    """What ``column_stats`` computes, with PyTorch ops (for the tests)."""
    var, mean = torch.var_mean(x.double(), dim=0, correction=0)
    return torch.stack([mean, torch.rsqrt(var + eps), var]).float()
