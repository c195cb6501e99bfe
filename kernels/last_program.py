"""Partial results merged inside the launch that writes them: the program that arrives last does it.

A kernel whose programs each reduce a tile (per-column statistics, column sums, a split of a weight
gradient) writes one partial result per program. Instead of a second launch that merges them, every
program counts its arrival on an atomic counter once its partial is written; the last program of each
group of ``GROUP`` partials merges that group into the group's first partial row, and the last group to
finish merges the groups and writes the final result (two levels, so that no program merges more than
``GROUP`` rows, or ``cdiv(tiles, GROUP)`` at the second level: a serial tail of a few microseconds, not
one program walking thousands of rows). The merge order is fixed by the indices, not by who arrives
last: results are deterministic.

Ordering: a program's stores are made visible before its arrival by a CTA barrier followed by a
release-acquire atomic at GPU scope (``arrive``); the merging program, having acquired, reads the partials
with ``.cg`` loads (from L2, never a stale L1 line). Each merging program resets its counter to zero after
merging, so a counter array is zero again after every complete launch (autotuning's repeated trials
included); callers pass counters zeroed once per dense block (``counters``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv

# Partial rows merged by the last program of a group (the first level); the second level merges one row per
# group. 32 rows of a 128-column fp32 tile are 16 KB per array.
GROUP = 32
_GROUP = tl.constexpr(GROUP)  # the same, as the kernels read it


def groups_of(tiles: int) -> int:
    return cdiv(tiles, GROUP)


def counters_needed(tiles: int, column_tiles: int = 1) -> int:
    """The counters one launch of ``tiles`` partial rows per column tile uses (``finish_*``'s layout)."""
    return column_tiles * (groups_of(tiles) + 1)


def counters(count: int, device: torch.device) -> torch.Tensor:
    """``count`` zeroed int32 arrival counters (one launch: a dense block takes one array for all its kernels)."""
    return torch.zeros(max(count, 1), dtype=torch.int32, device=device)


class CounterPool:
    """Zeroed counters carved in order out of one array (a dense block's launches take theirs from it): one
    zero-fill for many launches. Past its end, a fresh array (a caller that asked for too few)."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.array, self.used, self.device = counters(count, device), 0, device

    def take(self, count: int) -> torch.Tensor:
        if self.used + count > self.array.numel():
            return counters(count, self.device)
        part = self.array[self.used : self.used + count]
        self.used += count
        return part


def take_counters(pool: CounterPool | None, count: int, device: torch.device) -> torch.Tensor:
    return counters(count, device) if pool is None else pool.take(count)


@triton.jit
def arrive(counter_ptr, expected):
    """Count this program's arrival; True in the program that arrives ``expected``-th, to which every
    arriving program's earlier stores are visible (a barrier orders this program's threads' stores before
    its release; the atomic's acquire makes the others' visible here)."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel") == expected - 1


@triton.jit
def chan_update(count, mean, m2, t_count, t_mean, t_m2):
    """Running (count, mean, M2) merged with a tile's (Chan et al.'s pairwise update; empty tiles leave it)."""
    total = count + t_count
    delta = t_mean - mean
    weight = t_count / tl.maximum(total, 1.0)
    return total, mean + delta * weight, m2 + t_m2 + delta * delta * count * weight


@triton.jit
def _rows_of(partials, span, rows_per_tile, M):
    """The data rows (as fp32) behind partial rows ``partials``, each covering ``span`` tiles of
    ``rows_per_tile`` rows (the last one may hang over ``M``)."""
    return tl.minimum(tl.maximum(M - partials * rows_per_tile, 0), span * rows_per_tile).to(tl.float32)


@triton.jit
def merge_statistics(
    mean_ptr, m2_ptr, first, n, step, rows_per_tile, M, cols, col_mask, C, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """(count, mean, M2) of the columns ``cols`` over ``n`` partial rows ``first, first + step, ...`` of
    ``(tiles, C)`` mean and M2 arrays, each row covering ``step`` tiles: each step's rows combined with
    weights, then Chan et al.'s pairwise update."""
    count = tl.zeros((), tl.float32)
    mean = tl.zeros(cols.shape, tl.float32)
    m2 = tl.zeros(cols.shape, tl.float32)
    for t0 in range(0, n, BLOCK_T):
        index = t0 + tl.arange(0, BLOCK_T)
        valid = index < n
        partials = first + index * step
        counts = tl.where(valid, _rows_of(partials, step, rows_per_tile, M), 0.0)
        offsets = partials.to(tl.int64)[:, None] * C + cols[None, :]
        mask = valid[:, None] & col_mask[None, :]
        t_means = tl.load(mean_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        t_m2s = tl.load(m2_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        t_count = tl.sum(counts, axis=0)
        weights = counts / tl.maximum(t_count, 1.0)
        t_mean = tl.sum(t_means * weights[:, None], axis=0)
        deviation = t_means - t_mean[None, :]
        t_m2 = tl.sum(t_m2s + deviation * deviation * counts[:, None], axis=0)
        count, mean, m2 = chan_update(count, mean, m2, t_count, t_mean, t_m2)
    return count, mean, m2


@triton.jit
def finish_statistics(
    mean_ptr, m2_ptr, counter_ptr, out_ptr, out_stride, eps, tile, tiles, rows_per_tile, M, cols, col_mask, C,
    column_tile, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """After this program wrote partial row ``tile`` (its ``rows_per_tile`` rows' mean and M2 of ``cols``):
    the two-level merge. The last program writes the columns' batch mean, ``1 / sqrt(var + eps)`` and
    biased variance as rows 0, 1 and 2 of ``out`` (row stride ``out_stride``). Counters:
    ``column_tile * (groups + 1)`` onwards (``counters_needed``)."""
    groups = tl.cdiv(tiles, _GROUP)
    counter = counter_ptr + column_tile * (groups + 1)
    group = tile // _GROUP
    first = group * _GROUP
    size = tl.minimum(tiles - first, _GROUP)
    if arrive(counter + group, size):
        count, mean, m2 = merge_statistics(mean_ptr, m2_ptr, first, size, 1, rows_per_tile, M, cols, col_mask, C,
                                           BLOCK_T)  # fmt: skip
        row = first.to(tl.int64) * C
        tl.store(mean_ptr + row + cols, mean, mask=col_mask, cache_modifier=".cg")
        tl.store(m2_ptr + row + cols, m2, mask=col_mask, cache_modifier=".cg")
        tl.store(counter + group, 0)
        if arrive(counter + groups, groups):
            count, mean, m2 = merge_statistics(mean_ptr, m2_ptr, 0, groups, _GROUP, rows_per_tile, M, cols, col_mask,
                                               C, BLOCK_T)  # fmt: skip
            var = m2 / tl.maximum(count, 1.0)
            tl.store(out_ptr + cols, mean, mask=col_mask)
            tl.store(out_ptr + out_stride + cols, tl.div_rn(1.0, tl.sqrt_rn(var + eps)), mask=col_mask)
            tl.store(out_ptr + 2 * out_stride + cols, var, mask=col_mask)
            tl.store(counter + groups, 0)


@triton.jit
def sum_rows(ptr, first, n, step, cols, col_mask, C, BLOCK_T: tl.constexpr):
    """The sum over ``n`` rows ``first, first + step, ...`` of a ``(tiles, C)`` float32 array, in index order."""
    total = tl.zeros(cols.shape, tl.float32)
    for t0 in range(0, n, BLOCK_T):
        index = t0 + tl.arange(0, BLOCK_T)
        offsets = (first + index * step).to(tl.int64)[:, None] * C + cols[None, :]
        mask = (index < n)[:, None] & col_mask[None, :]
        total += tl.sum(tl.load(ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    return total


@triton.jit
def _merge_group(ptr, first, size, cols, col_mask, C, BLOCK_T: tl.constexpr):
    """A group's ``size`` partial rows from ``first`` summed into its first row (the first level)."""
    total = sum_rows(ptr, first, size, 1, cols, col_mask, C, BLOCK_T)
    tl.store(ptr + first.to(tl.int64) * C + cols, total, mask=col_mask, cache_modifier=".cg")


@triton.jit
def merged_sums(a_ptr, b_ptr, counter_ptr, tile, tiles, cols, col_mask, C, column_tile, BLOCK_T: tl.constexpr):
    """After this program wrote row ``tile`` of two ``(tiles, C)`` partial-sum arrays: ``(done, a, b)``, with
    ``done`` True in the one program per column tile that holds the columns' total sums ``a`` and ``b``
    (two-level merge, counters as ``finish_statistics``'s; the caller writes them)."""
    done, a, b, _, _ = merged_sums4(a_ptr, b_ptr, a_ptr, b_ptr, counter_ptr, tile, tiles, cols, col_mask, C,
                                    column_tile, False, BLOCK_T)  # fmt: skip
    return done, a, b


@triton.jit
def merged_sums4(a_ptr, b_ptr, c_ptr, d_ptr, counter_ptr, tile, tiles, cols, col_mask, C, column_tile,
                 FOUR: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """``merged_sums`` of four partial-sum arrays at once (``FOUR``; else of ``a`` and ``b`` only): one arrival
    per program, so that the one program holding the totals writes what depends on all four."""
    groups = tl.cdiv(tiles, _GROUP)
    counter = counter_ptr + column_tile * (groups + 1)
    group = tile // _GROUP
    first = group * _GROUP
    size = tl.minimum(tiles - first, _GROUP)
    done = tile < 0  # False, as a tensor
    a = tl.zeros(cols.shape, tl.float32)
    b = tl.zeros(cols.shape, tl.float32)
    c = tl.zeros(cols.shape, tl.float32)
    d = tl.zeros(cols.shape, tl.float32)
    if arrive(counter + group, size):
        _merge_group(a_ptr, first, size, cols, col_mask, C, BLOCK_T)
        _merge_group(b_ptr, first, size, cols, col_mask, C, BLOCK_T)
        if FOUR:
            _merge_group(c_ptr, first, size, cols, col_mask, C, BLOCK_T)
            _merge_group(d_ptr, first, size, cols, col_mask, C, BLOCK_T)
        tl.store(counter + group, 0)
        if arrive(counter + groups, groups):
            a = sum_rows(a_ptr, 0, groups, _GROUP, cols, col_mask, C, BLOCK_T)
            b = sum_rows(b_ptr, 0, groups, _GROUP, cols, col_mask, C, BLOCK_T)
            if FOUR:
                c = sum_rows(c_ptr, 0, groups, _GROUP, cols, col_mask, C, BLOCK_T)
                d = sum_rows(d_ptr, 0, groups, _GROUP, cols, col_mask, C, BLOCK_T)
            done = tile >= 0
            tl.store(counter + groups, 0)
    return done, a, b, c, d
