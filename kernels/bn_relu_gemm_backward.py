"""Backward of BN-ReLU-1x1 conv over the block buffer (docs/design.md section 4), two kernels.

With ``u = (X[:, :C] - mean) * gamma * rstd + beta`` recomputed from the buffer (never stored) and ``dY`` the
gradient of the layer's bottleneck:

* ``dgrad``: ``P = (dY @ W1) * [u > 0]`` (norm1's output gradient), accumulated straight into the
  block's fp32 gradient buffer as ``G[:, :C] += coef * P`` (or written, for the first layer to reach those
  columns), with norm1's per-channel sums ``sum(P)`` and ``sum(P * (X - mean))`` from the epilogue: the
  launch's last programs merge them (``kernels.last_program``) and write norm1's weight and bias gradients
  and the block's running ``sum_g``/``sum_gx``. Each program owns its G tile: no atomics but the merge's
  arrival counters; deterministic.
* ``wgrad``: ``dW1 = dY^T @ relu(u)``, a reduction over the M rows split into ``SPLIT_M`` ranges whose fp32
  partials the last programs of each output tile sum (two levels of ``WGRAD_GROUP``) and write as the
  weight's gradient, in its dtype.

fp32 accumulation, int64 row offsets, every edge masked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .affine import bn_relu, load_norm, norm_arguments
from .conv3x3_backward import norm2_input_grad
from .last_program import CounterPool, arrive, counters_needed, merged_sums4, take_counters
from .launch import (
    INTERPRET,
    Moved,
    bucket,
    cdiv,
    check_kernel_tensors,
    check_rows,
    dot_precision,
    row_bucket,
    smallest,
    split_config,
    split_count,
    tuned,
    uninitialised,
    unit_columns,
)
from .offsets import row_offsets
from .stats import MERGE_ROWS, partials_moved
from .tiles import dot_weight, output_tile

_DGRAD_INTERPRET = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})
# Here N is the buffer prefix width C (up to ~1000) and the reduction runs over the 4k = 128 channels.
# The epilogue holds the product, the buffer tile, G's tile and their pointers at once: tiles of
# 128 x 64 or more take 8 warps (on 4 warps, and 128x128 on 8, bf16 spilled 250-450 B per thread).
# With NORM2_GRAD the K-loop also loads the bottleneck's tile and forms dY from it (2-D blocks), and with
# PAIRED an upper layer's masked product (a float32 tile) and the buffer tile are held across the second
# K-loop: on 4 warps, and 64x128 or 128x64 tiles by 64 on 8, that spilled 8-168 B per thread (triton 3.6 or
# 3.8). Cost on sm_90 over bf16/fp16/fp32 and every flag (compile_for_hopper.py --all, triton 3.8 and 3.6;
# no spills):
#   128x64x32, 8 warps, 3 stages: 113-255 regs, 32-121 KB
#   64x64x64,  8 warps, 3 stages: 87-240 regs, 32-146 KB
#   64x64x32,  8 warps, 3 stages: 74-209 regs, 16-73 KB
_DGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
# float32 with TF32 off (PRECISION="ieee"): FMA products, operands in registers; its launches are never paired
# (paired, every tile tried spilled 8-104 B per thread in one triton or the other), and the 4-warp 64x64 tiles
# above spilled 16-24 B in triton 3.8 once norm2's gradient was formed in the K-loop. Cost on sm_90, every
# flag unpaired (compile_for_hopper.py --all --match ieee, triton 3.8 and 3.6; no spills):
#   64x64x32, 8 warps, 3 stages: 112-128 regs, 57 KB
#   64x32x32, 4 warps, 3 stages: 96-162 regs, 49 KB
_DGRAD_IEEE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]
_DGRAD_ALL = [*_DGRAD_CONFIGS, *_DGRAD_IEEE_CONFIGS, _DGRAD_INTERPRET]
# The partial sums are sized for the smallest tiles a launch may take: on a GPU (and in a count) the GPU's
# configurations', so that the interpreter's small tile does not double what a launch allocates there.
_DGRAD_SIZED = _DGRAD_ALL if INTERPRET else [*_DGRAD_CONFIGS, *_DGRAD_IEEE_CONFIGS]
_DGRAD_MIN_BLOCK_M, _DGRAD_MIN_BLOCK_N = smallest(_DGRAD_SIZED, "BLOCK_M"), smallest(_DGRAD_SIZED, "BLOCK_N")


@tuned(
    _DGRAD_CONFIGS,
    key=["N_BUCKET", "K", "M_BUCKET", "FIRST", "NORM2_GRAD", "PAIRED"],
    restore_value=["g_ptr", "sums_ptr"],
    interpret=_DGRAD_INTERPRET,
    ieee=_DGRAD_IEEE_CONFIGS,
)
@triton.jit
def _dgrad_kernel(
    dy_ptr, y2_ptr, grad2_ptr, grad2_stride, dy_out_ptr, w_ptr, stride_w, x_ptr, mean_ptr, inv_ptr, gamma_ptr,
    beta_ptr, eps, g_ptr, part_ptr, counter_ptr, d_gamma_ptr, d_beta_ptr, sums_ptr, sums_stride,
    du_ptr, wu_ptr, stride_wu, mean_u_ptr, inv_u_ptr, gamma_u_ptr, beta_u_ptr, d_gamma_u_ptr, d_beta_u_ptr,
    M, N, K, stride_x, stride_g, N_BUCKET, M_BUCKET,
    FROM_VAR: tl.constexpr, FIRST: tl.constexpr, SUMS: tl.constexpr, NORM2_GRAD: tl.constexpr,
    STORE_DY: tl.constexpr, PAIRED: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    mask = row_mask[:, None] & col_mask[None, :]
    x_ptrs = x_ptr + row_offsets(rows, stride_x)[:, None] + cols[None, :]
    tile = tl.program_id(0)
    partial_row = tile.to(tl.int64) * N
    parts = tl.num_programs(0).to(tl.int64) * N  # one partial array's size
    # PAIRED: the layer above's contribution too (its dY given, its own columns done already), so that G's
    # prefix and the buffer's are read and written once for both layers. Its product is taken through its
    # mask before the lower layer's product begins: one float32 tile held across the second K-loop, not two.
    upper = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    coef_u = tl.zeros((BLOCK_N,), tl.float32)
    if PAIRED:
        x = tl.load(x_ptrs, mask=mask, other=0.0)
        acc = _product(du_ptr, du_ptr, grad2_ptr, 0, du_ptr, wu_ptr, stride_wu, rows, row_mask, cols, col_mask, K,
                       False, False, INTERPRETED, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        upper, coef_u = _through_mask(acc, x, mask, cols, col_mask, mean_u_ptr, inv_u_ptr, gamma_u_ptr, beta_u_ptr,
                                      eps, part_ptr + 2 * parts, parts, partial_row, FROM_VAR, INTERPRETED)  # fmt: skip
    acc = _product(dy_ptr, y2_ptr, grad2_ptr, grad2_stride, dy_out_ptr, w_ptr, stride_w, rows, row_mask, cols,
                   col_mask, K, NORM2_GRAD, STORE_DY, INTERPRETED, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    if not PAIRED:  # (loaded after the K-loop: fewer registers held across it)
        x = tl.load(x_ptrs, mask=mask, other=0.0)
    contribution, coef = _through_mask(acc, x, mask, cols, col_mask, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps,
                                       part_ptr, parts, partial_row, FROM_VAR, INTERPRETED)  # fmt: skip
    contribution += upper
    g_ptrs = g_ptr + row_offsets(rows, stride_g)[:, None] + cols[None, :]
    if FIRST:  # the first layer (pair) to reach these columns: nothing to add to
        tl.store(g_ptrs, contribution, mask=mask)
    else:
        tl.store(g_ptrs, tl.load(g_ptrs, mask=mask, other=0.0) + contribution, mask=mask)
    done, sum_p, sum_px, sum_pu, sum_pxu = merged_sums4(
        part_ptr, part_ptr + parts, part_ptr + 2 * parts, part_ptr + 3 * parts, counter_ptr, tile,
        tl.num_programs(0), cols, col_mask, N, tl.program_id(1), PAIRED, BLOCK_T,
    )  # fmt: skip
    if done:  # norm1's bias and weight gradients; the block's per-channel sums of G and G * xhat
        rstd = _rstd(inv_ptr, eps, cols, col_mask, FROM_VAR)
        d_gamma = sum_px * rstd
        tl.store(d_beta_ptr + cols, sum_p.to(d_beta_ptr.dtype.element_ty), mask=col_mask)
        tl.store(d_gamma_ptr + cols, d_gamma.to(d_gamma_ptr.dtype.element_ty), mask=col_mask)
        into_g, into_gx = coef * sum_p, coef * d_gamma
        if PAIRED:
            d_gamma_u = sum_pxu * _rstd(inv_u_ptr, eps, cols, col_mask, FROM_VAR)
            tl.store(d_beta_u_ptr + cols, sum_pu.to(d_beta_u_ptr.dtype.element_ty), mask=col_mask)
            tl.store(d_gamma_u_ptr + cols, d_gamma_u.to(d_gamma_u_ptr.dtype.element_ty), mask=col_mask)
            into_g, into_gx = into_g + coef_u * sum_pu, into_gx + coef_u * d_gamma_u
        if SUMS:
            sum_g = tl.load(sums_ptr + cols, mask=col_mask, other=0.0)
            sum_gx = tl.load(sums_ptr + sums_stride + cols, mask=col_mask, other=0.0)
            tl.store(sums_ptr + cols, sum_g + into_g, mask=col_mask)
            tl.store(sums_ptr + sums_stride + cols, sum_gx + into_gx, mask=col_mask)


@triton.jit
def _product(dy_ptr, y2_ptr, grad2_ptr, grad2_stride, dy_out_ptr, w_ptr, stride_w, rows, row_mask, cols, col_mask, K,
             NORM2_GRAD: tl.constexpr, STORE_DY: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """``dY @ W1[:, cols]`` for this program's rows: dY (M x K, contiguous) against the 1x1 conv's weight, K rows
    of stride ``stride_w``. NORM2_GRAD: ``dy_ptr`` holds norm2's output gradient, from which dY is formed as it
    is loaded (never stored, but by the first column tile with STORE_DY, for a pairing launch)."""
    dy_rows = row_offsets(rows, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        dy_mask = row_mask[:, None] & k_mask[None, :]
        dy = tl.load(dy_ptr + dy_rows[:, None] + ks[None, :], mask=dy_mask, other=0.0)
        if NORM2_GRAD:
            y2 = tl.load(y2_ptr + dy_rows[:, None] + ks[None, :], mask=dy_mask, other=0.0)
            dy = norm2_input_grad(dy, y2, dy_mask, grad2_ptr, grad2_stride, ks, k_mask, INTERPRETED)
            if STORE_DY and tl.program_id(1) == 0:
                tl.store(dy_out_ptr + dy_rows[:, None] + ks[None, :], dy, mask=dy_mask)
        acc = dot_weight(acc, dy, w_ptr, ks * stride_w, k_mask, cols, col_mask, INTERPRETED, PRECISION)
    return acc


@triton.jit
def _rstd(inv_ptr, eps, cols, col_mask, FROM_VAR: tl.constexpr):
    rstd = tl.load(inv_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    if FROM_VAR:
        rstd = tl.div_rn(1.0, tl.sqrt_rn(rstd + eps))
    return rstd


@triton.jit
def _through_mask(acc, x, mask, cols, col_mask, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, part_ptr, parts,
                  partial_row, FROM_VAR: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    """One layer's ``P = acc * [u > 0]`` (norm1's ReLU mask recomputed from the buffer tile ``x``): writes its
    two partial sums, ``sum(P)`` and ``sum(P * (x - mean))``, as row ``partial_row`` of the two arrays at
    ``part_ptr`` and ``parts`` after it; returns ``coef * P``, what it adds to G, and ``coef``: gamma with
    batch statistics (docs/design.md section 4), the map's slope with frozen ones."""
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = _rstd(inv_ptr, eps, cols, col_mask, FROM_VAR)
    gamma = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = gamma * rstd
    active = bn_relu(x, mean, scale, beta, INTERPRETED) > 0
    p = tl.where(mask & active, acc, 0.0)
    centered = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
    tl.store(part_ptr + partial_row + cols, tl.sum(p, axis=0), mask=col_mask)
    tl.store(part_ptr + parts + partial_row + cols, tl.sum(p * centered, axis=0), mask=col_mask)
    coef = scale if FROM_VAR else gamma
    return p * coef[None, :], coef


_WGRAD_INTERPRET = triton.Config({"BLOCK_N": 32, "BLOCK_C": 32, "BLOCK_M": 32, "SPLIT_M": 2, "SPLIT_ROWS": 16})
# wgrad, with norm2's gradient formed as dY is loaded or dY given (compile_for_hopper.py --all, triton 3.8 and
# 3.6; no spills; on 4 warps the first spilled 32-120 B once norm2's gradient was formed in its loop):
#   128x64 by 64 rows, 8 warps: 100-206 regs, 72-208 KB;  64x64 by 64 rows, 4 warps: 106-240 regs, 48-128 KB;
#   128x128 by 32 rows, 8 warps: 170-227 regs, 64-128 KB
_WGRAD_CONFIGS = [
    split_config({"BLOCK_N": 128, "BLOCK_C": 64, "BLOCK_M": 64, "SPLIT_M": 32}, 8, 3),
    split_config({"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_M": 64, "SPLIT_M": 64}, 4, 3),
    split_config({"BLOCK_N": 128, "BLOCK_C": 128, "BLOCK_M": 32, "SPLIT_M": 16}, 8, 3),
]
# float32 with TF32 off (PRECISION="ieee"): dY^T @ act on the FMA units spilled 4.6-11.3 KB per thread
# with the configurations above. Short row steps do not (compile_for_hopper.py --all --match ieee, triton
# 3.8 and 3.6): 64x64 by 16 rows on 4 warps (on 8 warps ptxas held it to 128 and it spilled 8 B in 3.6 once
# the prologue formed its map from the stored statistics), 128x64 by 16 rows, 64x64 by 32 rows: 110-255
# regs, 20-64 KB.
_WGRAD_IEEE_CONFIGS = [
    split_config({"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_M": 16, "SPLIT_M": 64}, 4, 3),
    split_config({"BLOCK_N": 128, "BLOCK_C": 64, "BLOCK_M": 16, "SPLIT_M": 32}, 8, 3),
    split_config({"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_M": 32, "SPLIT_M": 64}, 8, 3),
]
_WGRAD_ALL = [*_WGRAD_CONFIGS, *_WGRAD_IEEE_CONFIGS, _WGRAD_INTERPRET]
_WGRAD_MAX_SPLIT = max(c.kwargs["SPLIT_M"] for c in _WGRAD_ALL)
_WGRAD_MIN_N, _WGRAD_MIN_C = smallest(_WGRAD_ALL, "BLOCK_N"), smallest(_WGRAD_ALL, "BLOCK_C")
# Splits summed by the last program of a group (the first level of the merge); the second level sums the groups.
WGRAD_GROUP = 8
_WGRAD_GROUP = tl.constexpr(WGRAD_GROUP)


@tuned(
    _WGRAD_CONFIGS,
    key=["N", "C_BUCKET", "M_BUCKET", "NORM2_GRAD"],
    interpret=_WGRAD_INTERPRET,
    ieee=_WGRAD_IEEE_CONFIGS,
)
@triton.jit
def _wgrad_kernel(
    dy_ptr, y2_ptr, grad2_ptr, grad2_stride, x_ptr, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, part_ptr,
    counter_ptr, dw_ptr, M, N, C, stride_x, C_BUCKET, M_BUCKET,
    FROM_VAR: tl.constexpr, NORM2_GRAD: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_M: tl.constexpr,
    SPLIT_ROWS: tl.constexpr,
):  # fmt: skip
    pid_n, pid_c, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask, col_mask = ns < N, cols < C
    mean, scale, bias = load_norm(mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, cols, col_mask, FROM_VAR)
    splits = tl.num_programs(2)  # SPLIT_M, or fewer for few rows (split_count)
    rows_per_split = tl.cdiv(tl.cdiv(M, splits), BLOCK_M) * BLOCK_M
    start = split * rows_per_split
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for m0 in range(0, rows_per_split, BLOCK_M):
        rows = start + m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        dy_mask = row_mask[:, None] & n_mask[None, :]
        dy = tl.load(dy_ptr + row_offsets(rows, N)[:, None] + ns[None, :], mask=dy_mask, other=0.0)
        if NORM2_GRAD:  # dy holds norm2's output gradient: the bottleneck's formed here (as dgrad does)
            y2 = tl.load(y2_ptr + row_offsets(rows, N)[:, None] + ns[None, :], mask=dy_mask, other=0.0)
            dy = norm2_input_grad(dy, y2, dy_mask, grad2_ptr, grad2_stride, ns, n_mask, INTERPRETED)
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + row_offsets(rows, stride_x)[:, None] + cols[None, :], mask=mask, other=0.0)
        act = tl.where(mask, bn_relu(x, mean, scale, bias, INTERPRETED), 0.0).to(dy.dtype)  # relu(norm1(x))
        if INTERPRETED:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
            acc = tl.dot(tl.trans(dy.to(tl.float32)), act.to(tl.float32), acc)
        else:
            acc = tl.dot(tl.trans(dy), act, acc, input_precision=PRECISION)
    tile = ns[:, None] * C + cols[None, :]
    tile_mask = n_mask[:, None] & col_mask[None, :]
    tl.store(part_ptr + split * (N * C) + tile, acc, mask=tile_mask)
    # the splits' sum, merged by the last programs of this output tile: groups of splits, then the groups
    groups = tl.cdiv(splits, _WGRAD_GROUP)
    counter = counter_ptr + (pid_n * tl.num_programs(1) + pid_c) * (groups + 1)
    group = split // _WGRAD_GROUP
    first = group * _WGRAD_GROUP
    size = tl.minimum(splits - first, _WGRAD_GROUP)
    if arrive(counter + group, size):
        total = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        for s in range(first, first + size):  # (split offsets stay in int32: SPLIT_M * N * C < 2^31)
            total += tl.load(part_ptr + s * (N * C) + tile, mask=tile_mask, other=0.0, cache_modifier=".cg")
        tl.store(part_ptr + first * (N * C) + tile, total, mask=tile_mask, cache_modifier=".cg")
        tl.store(counter + group, 0)
        if arrive(counter + groups, groups):
            total = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
            for g in range(0, groups):
                total += tl.load(part_ptr + g * _WGRAD_GROUP * (N * C) + tile, mask=tile_mask, other=0.0,
                                 cache_modifier=".cg")  # fmt: skip
            tl.store(dw_ptr + tile, total.to(dw_ptr.dtype.element_ty), mask=tile_mask)
            tl.store(counter + groups, 0)


def dgrad_counters(m: int, c: int) -> int:
    """The arrival counters a dgrad launch over an ``m x c`` slice uses."""
    return counters_needed(cdiv(m, _DGRAD_MIN_BLOCK_M), cdiv(c, _DGRAD_MIN_BLOCK_N))


def wgrad_counters(c: int, k: int) -> int:
    """The arrival counters a wgrad launch for a ``k x c`` weight uses."""
    return cdiv(k, _WGRAD_MIN_N) * cdiv(c, _WGRAD_MIN_C) * (cdiv(_WGRAD_MAX_SPLIT, WGRAD_GROUP) + 1)


def norm1_backward_counters(m: int, c: int, k: int, need_weight: bool) -> int:
    """The arrival counters ``norm1_gemm_backward`` uses for an ``m x c`` prefix and ``k`` bottleneck channels."""
    return dgrad_counters(m, c) + (wgrad_counters(c, k) if need_weight else 0)


class UpperLayer(NamedTuple):
    """The layer above, paired into one dgrad launch over a prefix both layers read (``norm1_gemm_backward``'s
    ``upper``): its bottleneck's gradient ``d_y`` (``M x 4k``, contiguous, formed already), its 1x1 conv's
    weight (``4k x C_up``, contiguous, ``C_up`` past the prefix), its norm1 map (``C_up`` channels, the same
    statistics kind and eps) and its norm1 gradient vectors' first ``C`` entries, which the launch writes."""

    d_y: Tensor
    weight: Tensor
    norm: object
    d_gamma: Tensor
    d_beta: Tensor


def norm1_gemm_backward(
    d_y: Tensor,
    x: Tensor,
    norm,
    weight: Tensor,
    grad_sum: Tensor,
    *,
    d_gamma: Tensor,
    d_beta: Tensor,
    d_weight: Tensor | None = None,
    sums: Tensor | None = None,
    first: bool = False,
    pool: CounterPool | None = None,
    norm2_grad: tuple[Tensor, Tensor] | None = None,
    d_y_out: Tensor | None = None,
    upper: UpperLayer | None = None,
) -> None:
    """Backward of ``Y = relu(norm(x)) @ weight^T`` over an ``M x C`` buffer slice ``x``, written in place.

    d_y: ``M x 4k`` contiguous, in the compute dtype (``weight``'s). weight: ``4k x C`` with unit column
    stride (a slice of a wider layer's weight may be given), or a 1x1 conv weight's shape. norm: norm1's
    ``NormMap`` (batch or, with ``from_var``, running statistics). grad_sum: float32 columns of the block's G
    (unit column stride); ``coef * P`` is added to its first ``C`` (written, with ``first``), ``coef`` being
    gamma with batch statistics and the map's slope with running ones. Writes ``d_beta = sum(P)`` and
    ``d_gamma = sum(P * xhat)`` (C vectors), ``d_weight = d_y^T @ relu(norm(x))`` (a contiguous ``4k x C``
    array, or a 1x1 conv weight's shape, when given), and adds ``coef * d_beta`` and ``coef * d_gamma`` to
    the rows of ``sums`` (a ``(2, C)`` view of the block's float32 sums of G and G * xhat) when given.
    norm2_grad: ``(Y, vectors)``, the bottleneck and the ``(4, 4k)`` float32 vectors
    ``kernels.conv3x3_backward`` left; then ``d_y`` is norm2's output gradient ``dP``, and dgrad forms the
    bottleneck's gradient from it as it loads it (``norm2_input_grad``), as wgrad does; dgrad's first column
    tile stores it into ``d_y_out`` when given (for a pairing launch, ``upper``). upper: the layer
    above, whose contribution to these columns the dgrad launch adds too (``UpperLayer``).
    """
    check_kernel_tensors(d_y, x, weight, grad_sum)
    m, c = x.shape
    check_rows(m, "norm1_gemm_backward")
    k = weight.shape[0]
    w2d = weight.reshape(k, -1) if weight.dim() != 2 else weight
    if w2d.shape != (k, c) or not unit_columns(w2d) or d_y.shape != (m, k) or not d_y.is_contiguous():
        raise ValueError(
            f"norm1_gemm_backward: shapes d_y {tuple(d_y.shape)}, x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if not unit_columns(x):
        raise ValueError(f"norm1_gemm_backward: x must have unit column stride, got strides {x.stride()}")
    if grad_sum.dtype != torch.float32 or not unit_columns(grad_sum) or grad_sum.shape[0] != m or grad_sum.shape[1] < c:
        raise ValueError(f"norm1_gemm_backward: grad_sum must be {m} x C (C >= {c}) float32 columns with unit "
                         "column stride (its first C columns receive the gradient)")  # fmt: skip
    if d_weight is not None and (d_weight.numel() != k * c or not d_weight.is_contiguous()):
        raise ValueError(f"norm1_gemm_backward: d_weight must be a contiguous {k} x {c} array")
    if sums is not None and (sums.shape != (2, c) or sums.dtype != torch.float32 or sums.stride(1) != 1):
        raise ValueError(f"norm1_gemm_backward: sums must be a float32 (2, {c}) view with unit column stride")
    if upper is not None:
        c_up = upper.weight.shape[-1] if upper.weight.dim() == 2 else upper.weight[0].numel()
        if upper.d_y.shape != (m, k) or not upper.d_y.is_contiguous() or not upper.weight.is_contiguous() or c_up < c:
            raise ValueError(f"norm1_gemm_backward: upper must have a contiguous {m} x {k} d_y and a contiguous "
                             f"{k} x C weight of at least {c} channels")  # fmt: skip
    y2, grad2, grad2_stride = d_y, d_y, 0  # unused pointers without norm2_grad
    store_dy = False
    if norm2_grad is not None:
        y2, grad2 = norm2_grad
        if y2.shape != d_y.shape or not y2.is_contiguous() or grad2.shape != (4, k) or grad2.dtype != torch.float32:
            raise ValueError(f"norm1_gemm_backward: norm2_grad must be a contiguous {m} x {k} bottleneck and "
                             f"float32 (4, {k}) vectors")  # fmt: skip
        grad2_stride = grad2.stride(0)
        store_dy = d_y_out is not None
    if m == 0 or c == 0:  # no rows: every sum and gradient is zero (and G has nothing to receive)
        for t in (d_gamma, d_beta, *([] if d_weight is None else [d_weight])):
            t.zero_()
        if upper is not None:
            upper.d_gamma.zero_()
            upper.d_beta.zero_()
        return
    mean, inv, gamma, beta, eps = norm_arguments(norm)
    up = (upper.d_y, upper.weight, upper.weight.reshape(k, -1).stride(0), *norm_arguments(upper.norm)[:4],
          upper.d_gamma, upper.d_beta) if upper is not None else (d_y, weight, 0, mean, inv, gamma, beta, d_gamma,
                                                                  d_beta)  # fmt: skip
    # Partial results, uninitialised: room for the most any configuration writes; the last programs read only
    # the rows their launch wrote. Two arrays a layer (sum(P), sum(P * centered)).
    partials = uninitialised(4 if upper is not None else 2, cdiv(m, _DGRAD_MIN_BLOCK_M), c, device=x.device)
    counter = take_counters(pool, dgrad_counters(m, c), x.device)

    def dgrad_grid(meta):
        return cdiv(m, meta["BLOCK_M"]), cdiv(c, meta["BLOCK_N"])

    _dgrad_kernel[dgrad_grid](
        d_y, y2, grad2, grad2_stride, d_y_out if store_dy else d_y, w2d, w2d.stride(0), x, mean, inv, gamma, beta,
        float(eps), grad_sum, partials, counter, d_gamma, d_beta, sums if sums is not None else grad_sum,
        sums.stride(0) if sums is not None else 0, *up, m, c, k, x.stride(0), grad_sum.stride(0), bucket(c),
        row_bucket(m), FROM_VAR=bool(norm.from_var), FIRST=first, SUMS=sums is not None,
        NORM2_GRAD=norm2_grad is not None, STORE_DY=store_dy, PAIRED=upper is not None, INTERPRETED=INTERPRET,
        PRECISION=dot_precision(weight.dtype), BLOCK_T=MERGE_ROWS,
    )  # fmt: skip
    if d_weight is not None:
        norm1_weight_grad(d_y, x, norm, d_weight, pool=pool, norm2_grad=norm2_grad)


def norm1_weight_grad(
    d_y: Tensor,
    x: Tensor,
    norm,
    d_weight: Tensor,
    *,
    pool: CounterPool | None = None,
    norm2_grad: tuple[Tensor, Tensor] | None = None,
) -> None:
    """wgrad alone: ``d_weight = d_y^T @ relu(norm(x))`` over an ``M x C`` buffer slice (``d_y``: ``M x 4k``,
    contiguous; ``d_weight``: a contiguous ``4k x C`` array or a 1x1 conv weight's shape). norm2_grad: as
    ``norm1_gemm_backward``'s (``d_y`` is then norm2's output gradient, dY formed as it is loaded: no tensor
    of the bottleneck's size is written for it)."""
    check_kernel_tensors(d_y, x, d_weight)
    (m, c), k = x.shape, d_y.shape[1]
    if d_y.shape[0] != m or not d_y.is_contiguous() or d_weight.numel() != k * c or not d_weight.is_contiguous():
        raise ValueError(f"norm1_weight_grad: shapes d_y {tuple(d_y.shape)}, x {tuple(x.shape)}, d_weight "
                         f"{tuple(d_weight.shape)}")  # fmt: skip
    if m == 0 or c == 0:
        d_weight.zero_()
        return
    mean, inv, gamma, beta, eps = norm_arguments(norm)
    most = max(split_count(m, config.kwargs) for config in _WGRAD_ALL)  # no room for splits a launch never has
    splits = uninitialised(most, k, c, device=x.device)
    counter = take_counters(pool, wgrad_counters(c, k), x.device)
    y2, grad2 = norm2_grad if norm2_grad is not None else (d_y, d_y)  # unused pointers without it

    def wgrad_grid(meta):
        return cdiv(k, meta["BLOCK_N"]), cdiv(c, meta["BLOCK_C"]), split_count(m, meta)

    _wgrad_kernel[wgrad_grid](
        d_y, y2, grad2, grad2.stride(0) if norm2_grad is not None else 0, x, mean, inv, gamma, beta, float(eps),
        splits, counter, d_weight, m, k, c, x.stride(0), bucket(c), row_bucket(m), FROM_VAR=bool(norm.from_var),
        NORM2_GRAD=norm2_grad is not None, INTERPRETED=INTERPRET, PRECISION=dot_precision(d_y.dtype),
    )  # fmt: skip


def norm1_gemm_backward_reference(d_y, x, norm, weight, grad_sum, need_weight, sums=None, first=False):
    """``norm1_gemm_backward`` with PyTorch ops (for the tests): returns ``(d_gamma, d_beta, d_weight)``."""
    mean, scale, bias = norm.vectors()
    rstd = norm.rstd().float()
    act = ((x.float() - mean) * scale + bias).to(x.dtype).float().relu()
    p = (d_y.float() @ weight.float().reshape(weight.shape[0], -1)) * (act > 0)
    coef = scale if norm.from_var else norm.weight.float()
    if first:
        grad_sum[:, : x.shape[1]] = p * coef
    else:
        grad_sum[:, : x.shape[1]] += p * coef
    d_beta, d_gamma = p.sum(0), (p * (x.float() - mean)).sum(0) * rstd
    if sums is not None:
        sums[0] += coef * d_beta
        sums[1] += coef * d_gamma
    d_w = d_y.float().t() @ act.to(d_y.dtype).float() if need_weight else None
    return d_gamma, d_beta, d_w


@_dgrad_kernel.planned
def _dgrad_plan(args: dict, meta: dict) -> Moved:
    """Each row tile reads its rows of dY once per column tile (the K-loop), each column tile all of W once
    per row tile; the buffer tile and G's tile (read unless first, written) and four vectors once per row
    tile; two sums per column and row tile, merged by the last programs, which write norm1's two gradients
    (and read and write the block's two sums). PAIRED: the layer above's dY, W and vectors the same way (its
    mean and rstd are the same rows as this layer's with batch statistics), and its two sums and gradients;
    the buffer and G once for both."""
    m, n, k = args["M"], args["N"], args["K"]
    layers = 2 if args["PAIRED"] else 1
    row_tiles, col_tiles = cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])
    dy_bytes, w_bytes = m * k * args["dy_ptr"].element_size(), k * n * args["w_ptr"].element_size()
    once = m * n * (args["x_ptr"].element_size() + (0 if args["FIRST"] else 4))
    vector = n * args["mean_ptr"].element_size()
    vectors = 4 * vector * layers
    shared = 2 * vector if args["PAIRED"] and not args["FROM_VAR"] else 0  # the upper's mean and rstd: these
    norm2 = 4 * k * 4 if args["NORM2_GRAD"] else 0  # norm2's four vectors, read by every program's K-loop
    dy_written = dy_bytes if args["STORE_DY"] else 0  # dY formed from dP, stored by the first column tile
    dy_bytes = dy_bytes * (2 if args["NORM2_GRAD"] else 1) + (dy_bytes if args["PAIRED"] else 0)
    w_bytes *= layers
    read = dy_bytes * col_tiles + w_bytes * row_tiles + once + vectors * row_tiles + norm2 * row_tiles * col_tiles
    compulsory_read = dy_bytes + w_bytes + once + vectors - shared + norm2
    sums = 2 * n * 4 * 2 if args["SUMS"] else 0
    moved = Moved(read + sums, m * n * 4 + sums + dy_written, 2 * m * k * n * layers, read - compulsory_read)
    return moved + partials_moved(row_tiles, n, arrays=2 * layers, finals=2 * layers)


@_wgrad_kernel.planned
def _wgrad_plan(args: dict, meta: dict) -> Moved:
    """dY's rows once per tile of the buffer's columns, the buffer's once per tile of dY's; every split
    writes its N x C float32 partial, the first level's last programs read them and write one per group, the
    last reads those and writes the gradient."""
    m, n, c = args["M"], args["N"], args["C"]
    split = split_count(m, meta)
    n_tiles, c_tiles = cdiv(n, meta["BLOCK_N"]), cdiv(c, meta["BLOCK_C"])
    dy_bytes, x_bytes = m * n * args["dy_ptr"].element_size(), m * c * args["x_ptr"].element_size()
    vectors = 4 * c * args["mean_ptr"].element_size()
    if args["NORM2_GRAD"]:  # dP and the bottleneck instead of dY, with norm2's four vectors per program
        dy_bytes, vectors = 2 * dy_bytes, vectors + 4 * n * 4
    read = dy_bytes * c_tiles + x_bytes * n_tiles + vectors * n_tiles * split
    groups = cdiv(split, WGRAD_GROUP)
    partial = n * c * 4
    merged = Moved((split + groups) * partial, (split + groups) * partial + n * c * args["dw_ptr"].element_size(),
                   0, groups * partial)  # fmt: skip
    return Moved(read, 0, 2 * m * n * c, read - (dy_bytes + x_bytes + vectors)) + merged
