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

import torch
import triton
import triton.language as tl
from torch import Tensor

from .affine import bn_relu, load_norm, norm_arguments
from .conv3x3_backward import norm2_input_grad
from .last_program import CounterPool, arrive, counters_needed, merged_sums, take_counters
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
# With NORM2_GRAD the K-loop also loads the bottleneck's tile and forms dY from it (2-D blocks): 128x64x64
# on 3 stages then needed 242 KB of shared memory in float32, over the 227 KB a block has, so it runs on 2,
# and the first configuration (FASTDENSE_AUTOTUNE=0's, and the count's) is the 128-column one, which
# also reads the K-loop's row tile half as often. Cost on sm_90 over bf16/fp16/fp32, every flag
# (compile_for_hopper.py --all, triton 3.8 and 3.6; no spills):
#   64x128x64, 8 warps, 3 stages: 141-237 regs, 72-194 KB
#   128x64x64, 8 warps, 2 stages: 139-252 regs, 48-161 KB
#   64x64x64,  4 warps, 3 stages: 137-255 regs, 48-138 KB
#   64x64x32,  4 warps, 4 stages: 135-238 regs, 32-97 KB
_DGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
# float32 with TF32 off (PRECISION="ieee"): FMA products; 128x64x64, and 64x128x64 with NORM2_GRAD, spilled
# 8 B per thread there in triton 3.6 (ptxas held them to 128 registers); the 64x64 tiles do not
# (128-255 regs, 48-114 KB; compile_for_hopper.py --all --match ieee).
_DGRAD_IEEE_CONFIGS = _DGRAD_CONFIGS[2:]
_DGRAD_ALL = [*_DGRAD_CONFIGS, _DGRAD_INTERPRET]
_DGRAD_MIN_BLOCK_M, _DGRAD_MIN_BLOCK_N = smallest(_DGRAD_ALL, "BLOCK_M"), smallest(_DGRAD_ALL, "BLOCK_N")


@tuned(
    _DGRAD_CONFIGS,
    key=["N_BUCKET", "K", "M_BUCKET", "FIRST", "NORM2_GRAD"],
    restore_value=["g_ptr", "sums_ptr"],
    interpret=_DGRAD_INTERPRET,
    ieee=_DGRAD_IEEE_CONFIGS,
)
@triton.jit
def _dgrad_kernel(
    dy_ptr, y2_ptr, grad2_ptr, grad2_stride, dy_out_ptr, w_ptr, x_ptr, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps,
    g_ptr,
    part_p_ptr, part_px_ptr, counter_ptr, d_gamma_ptr, d_beta_ptr, sums_ptr, sums_stride,
    M, N, K, stride_x, stride_g, N_BUCKET, M_BUCKET,
    FROM_VAR: tl.constexpr, FIRST: tl.constexpr, SUMS: tl.constexpr, NORM2_GRAD: tl.constexpr,
    STORE_DY: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    dy_rows = row_offsets(rows, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):  # dY (M x K, contiguous) @ W1 (K x N, row-major)
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        dy_mask = row_mask[:, None] & k_mask[None, :]
        dy = tl.load(dy_ptr + dy_rows[:, None] + ks[None, :], mask=dy_mask, other=0.0)
        if NORM2_GRAD:  # dy holds norm2's output gradient: its input gradient formed here, stored once for wgrad
            y2 = tl.load(y2_ptr + dy_rows[:, None] + ks[None, :], mask=dy_mask, other=0.0)
            dy = norm2_input_grad(dy, y2, dy_mask, grad2_ptr, grad2_stride, ks, k_mask, INTERPRETED)
            if STORE_DY and tl.program_id(1) == 0:
                tl.store(dy_out_ptr + dy_rows[:, None] + ks[None, :], dy, mask=dy_mask)
        acc = dot_weight(acc, dy, w_ptr, ks * N, k_mask, cols, col_mask, INTERPRETED, PRECISION)

    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + row_offsets(rows, stride_x)[:, None] + cols[None, :], mask=mask, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.load(inv_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    if FROM_VAR:
        rstd = tl.div_rn(1.0, tl.sqrt_rn(rstd + eps))
    gamma = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = gamma * rstd
    active = bn_relu(x, mean, scale, beta, INTERPRETED) > 0  # norm1's ReLU mask, recomputed
    p = tl.where(mask & active, acc, 0.0)
    # P's factor into G: gamma with batch statistics (docs/design.md section 4); the map's slope with frozen ones
    coef = scale if FROM_VAR else gamma
    g_ptrs = g_ptr + row_offsets(rows, stride_g)[:, None] + cols[None, :]
    if FIRST:  # the first layer to reach these columns: nothing to add to
        tl.store(g_ptrs, p * coef[None, :], mask=mask)
    else:
        tl.store(g_ptrs, tl.load(g_ptrs, mask=mask, other=0.0) + p * coef[None, :], mask=mask)
    centered = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
    tile = tl.program_id(0)
    partial_row = tile.to(tl.int64) * N
    tl.store(part_p_ptr + partial_row + cols, tl.sum(p, axis=0), mask=col_mask)
    tl.store(part_px_ptr + partial_row + cols, tl.sum(p * centered, axis=0), mask=col_mask)
    done, sum_p, sum_px = merged_sums(part_p_ptr, part_px_ptr, counter_ptr, tile, tl.num_programs(0), cols, col_mask,
                                      N, tl.program_id(1), BLOCK_T)  # fmt: skip
    if done:  # norm1's bias and weight gradients; the block's per-channel sums of G and G * xhat
        d_gamma = sum_px * rstd
        tl.store(d_beta_ptr + cols, sum_p.to(d_beta_ptr.dtype.element_ty), mask=col_mask)
        tl.store(d_gamma_ptr + cols, d_gamma.to(d_gamma_ptr.dtype.element_ty), mask=col_mask)
        if SUMS:
            sum_g = tl.load(sums_ptr + cols, mask=col_mask, other=0.0)
            sum_gx = tl.load(sums_ptr + sums_stride + cols, mask=col_mask, other=0.0)
            tl.store(sums_ptr + cols, sum_g + coef * sum_p, mask=col_mask)
            tl.store(sums_ptr + sums_stride + cols, sum_gx + coef * d_gamma, mask=col_mask)


_WGRAD_INTERPRET = triton.Config({"BLOCK_N": 32, "BLOCK_C": 32, "BLOCK_M": 32, "SPLIT_M": 2, "SPLIT_ROWS": 16})
# wgrad: 130-152, 96-148 and 116-140 registers per thread, 64-144 KB of shared memory (no spills).
_WGRAD_CONFIGS = [
    split_config({"BLOCK_N": 128, "BLOCK_C": 64, "BLOCK_M": 64, "SPLIT_M": 32}, 4, 3),
    split_config({"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_M": 64, "SPLIT_M": 64}, 4, 3),
    split_config({"BLOCK_N": 128, "BLOCK_C": 128, "BLOCK_M": 32, "SPLIT_M": 16}, 8, 3),
]
# float32 with TF32 off (PRECISION="ieee"): dY^T @ act on the FMA units spilled 4.6-11.3 KB per thread
# with the configurations above. Short row steps do not (compile_for_hopper.py --all --match ieee, triton
# 3.8 and 3.6): 64x64 by 16 rows on 4 warps 254-255 regs (on 8 warps ptxas held it to 128 and it spilled
# 8 B in 3.6 once the prologue formed its map from the stored statistics), 128x64 by 16 rows 249, 64x64
# by 32 rows 254; 20-41 KB.
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
    key=["N", "C_BUCKET", "M_BUCKET"],
    interpret=_WGRAD_INTERPRET,
    ieee=_WGRAD_IEEE_CONFIGS,
)
@triton.jit
def _wgrad_kernel(
    dy_ptr, x_ptr, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, part_ptr, counter_ptr, dw_ptr,
    M, N, C, stride_x, C_BUCKET, M_BUCKET,
    FROM_VAR: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
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


def _dgrad_counters(m: int, c: int) -> int:
    """The arrival counters the dgrad launch over an ``m x c`` prefix uses (the first of the backward's)."""
    return counters_needed(cdiv(m, _DGRAD_MIN_BLOCK_M), cdiv(c, _DGRAD_MIN_BLOCK_N))


def norm1_backward_counters(m: int, c: int, k: int, need_weight: bool) -> int:
    """The arrival counters ``norm1_gemm_backward`` uses for an ``m x c`` prefix and ``k`` bottleneck channels."""
    dgrad = _dgrad_counters(m, c)
    tiles = cdiv(k, _WGRAD_MIN_N) * cdiv(c, _WGRAD_MIN_C)
    wgrad = tiles * (cdiv(_WGRAD_MAX_SPLIT, WGRAD_GROUP) + 1) if need_weight else 0
    return dgrad + wgrad


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
) -> None:
    """Backward of ``Y = relu(norm(x)) @ weight^T`` over an ``M x C`` buffer prefix ``x``, written in place.

    d_y: ``M x 4k`` contiguous, in the compute dtype (``weight``'s). norm: norm1's ``NormMap`` (batch or, with
    ``from_var``, running statistics). grad_sum: the block's ``M x C_total`` float32 G; ``coef * P`` is added to
    its first C columns (written, with ``first``), ``coef`` being gamma with batch statistics and the map's
    slope with running ones. Writes ``d_beta = sum(P)`` and ``d_gamma = sum(P * xhat)`` (C vectors),
    ``d_weight = d_y^T @ relu(norm(x))`` (a contiguous ``4k x C`` array, or a 1x1 conv weight's shape, when
    given), and adds ``coef * d_beta`` and ``coef * d_gamma`` to the rows of ``sums`` (a ``(2, C)`` view of the
    block's float32 sums of G and G * xhat) when given. norm2_grad: ``(Y, vectors)``, the bottleneck and the
    ``(4, 4k)`` float32 vectors ``kernels.conv3x3_backward`` left; then ``d_y`` is norm2's output gradient
    ``dP``: dgrad forms the bottleneck's gradient from it as it loads it (``norm2_input_grad``) and its first
    column tile stores it for wgrad.
    """
    check_kernel_tensors(d_y, x, weight, grad_sum)
    m, c = x.shape
    check_rows(m, "norm1_gemm_backward")
    k = weight.shape[0]
    if weight.numel() != k * c or not weight.is_contiguous() or d_y.shape != (m, k) or not d_y.is_contiguous():
        raise ValueError(
            f"norm1_gemm_backward: shapes d_y {tuple(d_y.shape)}, x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if not unit_columns(x):
        raise ValueError(f"norm1_gemm_backward: x must have unit column stride, got strides {x.stride()}")
    if grad_sum.dtype != torch.float32 or not unit_columns(grad_sum) or grad_sum.shape[0] != m:
        raise ValueError("norm1_gemm_backward: grad_sum must be an M x C_total float32 matrix with unit column stride")
    if d_weight is not None and (d_weight.numel() != k * c or not d_weight.is_contiguous()):
        raise ValueError(f"norm1_gemm_backward: d_weight must be a contiguous {k} x {c} array")
    if sums is not None and (sums.shape != (2, c) or sums.dtype != torch.float32 or sums.stride(1) != 1):
        raise ValueError(f"norm1_gemm_backward: sums must be a float32 (2, {c}) view with unit column stride")
    if norm2_grad is not None:
        y2, grad2 = norm2_grad
        if y2.shape != d_y.shape or not y2.is_contiguous() or grad2.shape != (4, k) or grad2.dtype != torch.float32:
            raise ValueError(f"norm1_gemm_backward: norm2_grad must be a contiguous {m} x {k} bottleneck and "
                             f"float32 (4, {k}) vectors")  # fmt: skip
        dy_out = torch.empty_like(d_y) if d_weight is not None else d_y  # dY, for wgrad (else not stored)
    else:
        y2, grad2, dy_out = d_y, sums if sums is not None else grad_sum, d_y  # unused pointers
    if m == 0 or c == 0:  # no rows: every sum and gradient is zero (and G has nothing to receive)
        for t in (d_gamma, d_beta, *([] if d_weight is None else [d_weight])):
            t.zero_()
        return
    mean, inv, gamma, beta, eps = norm_arguments(norm)
    # Partial results, uninitialised: room for the most any configuration writes; the last programs read only
    # the rows their launch wrote.
    partials = uninitialised(2, cdiv(m, _DGRAD_MIN_BLOCK_M), c, device=x.device)
    counter = take_counters(pool, norm1_backward_counters(m, c, k, d_weight is not None), x.device)
    dgrad_counters = _dgrad_counters(m, c)
    precision = dot_precision(weight.dtype)

    def dgrad_grid(meta):
        return cdiv(m, meta["BLOCK_M"]), cdiv(c, meta["BLOCK_N"])

    grad2_stride = grad2.stride(0) if norm2_grad is not None else 0
    _dgrad_kernel[dgrad_grid](
        d_y, y2, grad2, grad2_stride, dy_out, weight, x, mean, inv, gamma, beta, float(eps), grad_sum, partials[0],
        partials[1], counter,
        d_gamma, d_beta, sums if sums is not None else grad_sum, sums.stride(0) if sums is not None else 0,
        m, c, k, x.stride(0), grad_sum.stride(0), bucket(c), row_bucket(m),
        FROM_VAR=bool(norm.from_var), FIRST=first, SUMS=sums is not None, NORM2_GRAD=norm2_grad is not None,
        STORE_DY=norm2_grad is not None and d_weight is not None,
        INTERPRETED=INTERPRET,
        PRECISION=precision, BLOCK_T=MERGE_ROWS,
    )  # fmt: skip
    if d_weight is None:
        return
    most = max(split_count(m, config.kwargs) for config in _WGRAD_ALL)  # no room for splits a launch never has
    splits = uninitialised(most, k, c, device=x.device)

    def wgrad_grid(meta):
        return cdiv(k, meta["BLOCK_N"]), cdiv(c, meta["BLOCK_C"]), split_count(m, meta)

    _wgrad_kernel[wgrad_grid](
        d_y if norm2_grad is None else dy_out, x, mean, inv, gamma, beta, float(eps), splits,
        counter[dgrad_counters:], d_weight, m, k, c, x.stride(0), bucket(c), row_bucket(m),
        FROM_VAR=bool(norm.from_var), INTERPRETED=INTERPRET, PRECISION=precision,
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
    (and read and write the block's two sums)."""
    m, n, k = args["M"], args["N"], args["K"]
    row_tiles, col_tiles = cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])
    dy_bytes, w_bytes = m * k * args["dy_ptr"].element_size(), k * n * args["w_ptr"].element_size()
    once = m * n * (args["x_ptr"].element_size() + (0 if args["FIRST"] else 4))
    vectors = 4 * n * args["mean_ptr"].element_size()
    norm2 = 4 * k * 4 if args["NORM2_GRAD"] else 0  # norm2's four vectors, read by every program's K-loop
    dy_written = dy_bytes if args["STORE_DY"] else 0  # dY formed from dP, stored by the first column tile
    dy_bytes *= 2 if args["NORM2_GRAD"] else 1  # dP and the bottleneck instead of dY
    read = dy_bytes * col_tiles + w_bytes * row_tiles + once + vectors * row_tiles + norm2 * row_tiles * col_tiles
    compulsory_read = dy_bytes + w_bytes + once + vectors + norm2
    sums = 2 * n * 4 * 2 if args["SUMS"] else 0
    moved = Moved(read + sums, m * n * 4 + sums + dy_written, 2 * m * k * n, read - compulsory_read)
    return moved + partials_moved(row_tiles, n, finals=2)


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
    read = dy_bytes * c_tiles + x_bytes * n_tiles + vectors * n_tiles * split
    groups = cdiv(split, WGRAD_GROUP)
    partial = n * c * 4
    merged = Moved((split + groups) * partial, (split + groups) * partial + n * c * args["dw_ptr"].element_size(),
                   0, groups * partial)  # fmt: skip
    return Moved(read, 0, 2 * m * n * c, read - (dy_bytes + x_bytes + vectors)) + merged
