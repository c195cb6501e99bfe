"""Backward of the 3x3 conv with norm2 and its ReLU (``new = conv3x3(relu(norm2(Y)))``), two kernels.

With ``D`` the gradient of a layer's ``k`` new channels (``M x k`` rows, dropout already undone), ``W`` the
``(k, C, 3, 3)`` weight and ``act = relu(norm2(Y))`` recomputed from the bottleneck ``Y`` (the forward's map
and rounding, never stored):

* ``conv3x3_dgrad``: the activation's gradient ``dA = conv3x3^T(D)`` (an implicit GEMM over the 9 taps times
  ``k`` channels, the weight's taps flipped), rounded to the compute dtype as cuDNN's is, through the ReLU
  mask: ``dP = dA * [act > 0]``, written (``M x C``, compute dtype). Its epilogue sums ``dP`` and
  ``dP * (Y - mean)`` per channel; the launch's last programs (``kernels.last_program``) write norm2's bias
  and weight gradients and the four vectors of its input gradient (``NORM2_GRAD`` rows):
  ``dY = (dP - MEAN_DP - (Y - MEAN) * PROJECTION) * SCALE``, PyTorch's BatchNorm backward formula (in eval
  mode ``dY = dP * SCALE``). ``dY`` is never stored: the 1x1 conv's backward kernels form it in their
  prologue (``kernels.bn_relu_gemm_backward``, ``norm2_grad=``).
* ``conv3x3_wgrad``: ``dW[:, :, tap] = D_tap^T @ act``, a reduction over the M rows split into ``SPLIT_M``
  ranges; a program computes its activation tile once and the nine taps' products from it against ``D``
  shifted (``D`` is 4x narrower than ``Y``), keeping nine accumulators; the last programs of each output
  tile sum the fp32 partials (two levels) and write the weight's gradient in its dtype.

fp32 accumulation, int64 row offsets, every edge masked; deterministic (no atomics but arrival counters).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .affine import bn_relu, norm_arguments, rounded
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
)
from .offsets import row_offsets
from .stats import MERGE_ROWS, partials_moved
from .tiles import dot_weight, output_tile

# Rows of the (4, C) float32 vectors conv3x3_dgrad leaves for norm2's input gradient.
SCALE, MEAN_DP, PROJECTION, MEAN = 0, 1, 2, 3
NORM2_GRAD_ROWS = 4
_SCALE, _MEAN_DP, _PROJECTION, _MEAN = (tl.constexpr(row) for row in (SCALE, MEAN_DP, PROJECTION, MEAN))  # the same

# (64 rows, as every GPU configuration: the partial sums are sized for the smallest row tile, and a launch's
# bottleneck-sized dP is live beside them)
_DGRAD_INTERPRET = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})
# N = 4k = 128 bottleneck channels (192 for DenseNet-161), the reduction 9 * k = 288 (432) long. The
# epilogue holds the product, the bottleneck tile and its pointers (as dgrad's does). Cost on sm_90 over
# bf16/fp16/fp32, batch and running statistics (compile_for_hopper.py --all, triton 3.8 and 3.6; no spills):
#   128x128x32, 8 warps, 3 stages: 194-255 regs, 32-96 KB
#   64x128x32,  4 warps, 3 stages: 192-255 regs, 20-72 KB
#   128x64x32,  4 warps, 3 stages: 187-255 regs, 28-72 KB
#   float32 with TF32 off (FMA products), 64x64x32, 4 warps, 3 stages: 128-196 regs, 32 KB
_DGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]
_DGRAD_IEEE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]
_DGRAD_ALL = [*_DGRAD_CONFIGS, *_DGRAD_IEEE_CONFIGS, _DGRAD_INTERPRET]
_DGRAD_MIN_BLOCK_M, _DGRAD_MIN_BLOCK_N = smallest(_DGRAD_ALL, "BLOCK_M"), smallest(_DGRAD_ALL, "BLOCK_N")


@tuned(
    _DGRAD_CONFIGS,
    key=["C_BUCKET", "K", "M_BUCKET", "FROM_VAR"],
    interpret=_DGRAD_INTERPRET,
    ieee=_DGRAD_IEEE_CONFIGS,
)
@triton.jit
def _conv3x3_dgrad_kernel(
    d_ptr, w_ptr, y_ptr, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, dp_ptr,
    part_a_ptr, part_b_ptr, counter_ptr, d_gamma_ptr, d_beta_ptr, grad_ptr, grad_stride,
    M, C, K, H, W, C_BUCKET, M_BUCKET,
    FROM_VAR: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows, cols, row_mask, col_mask = output_tile(M, C, BLOCK_M, BLOCK_N)
    h = (rows // W) % H
    w = rows % W
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tap in range(9):  # the output pixel rows + (dh, dw) read this pixel through the flipped tap 8 - tap
        dh, dw = tap // 3 - 1, tap % 3 - 1
        inside = row_mask & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
        src = d_ptr + row_offsets(rows + dh * W + dw, K)  # same image: rows are (n, h, w) in row-major order
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            d = tl.load(src[:, None] + ks[None, :], mask=inside[:, None] & k_mask[None, :], other=0.0)
            # W[ks, cols, 8 - tap], read where it lies in the (K, C, 3, 3) weight
            acc = dot_weight(acc, d, w_ptr, ks * (C * 9) + (8 - tap), k_mask, cols * 9, col_mask, INTERPRETED,
                             PRECISION)  # fmt: skip

    mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(y_ptr + row_offsets(rows, C)[:, None] + cols[None, :], mask=mask, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.load(inv_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    if FROM_VAR:
        rstd = tl.div_rn(1.0, tl.sqrt_rn(rstd + eps))
    scale = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * rstd
    beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    active = bn_relu(y, mean, scale, beta, INTERPRETED) > 0  # relu2's mask, as the forward's prologue saw it
    d_act = rounded(acc, dp_ptr.dtype.element_ty, INTERPRETED)  # the conv's gradient in the compute dtype
    dp = tl.where(mask & active, d_act, 0.0)
    tl.store(dp_ptr + row_offsets(rows, C)[:, None] + cols[None, :], dp, mask=mask)

    dp = dp.to(tl.float32)  # the sums of the stored (rounded) gradient, as PyTorch's BatchNorm backward takes them
    centered = tl.where(mask, y.to(tl.float32) - mean[None, :], 0.0)
    tile = tl.program_id(0)
    partial_row = tile.to(tl.int64) * C
    tl.store(part_a_ptr + partial_row + cols, tl.sum(dp, axis=0), mask=col_mask)
    tl.store(part_b_ptr + partial_row + cols, tl.sum(dp * centered, axis=0), mask=col_mask)
    done, sum_dp, sum_dpc = merged_sums(part_a_ptr, part_b_ptr, counter_ptr, tile, tl.num_programs(0), cols,
                                        col_mask, C, tl.program_id(1), BLOCK_T)  # fmt: skip
    if done:  # norm2's gradients, and the vectors of its input gradient
        d_gamma = sum_dpc * rstd
        tl.store(d_beta_ptr + cols, sum_dp.to(d_beta_ptr.dtype.element_ty), mask=col_mask)
        tl.store(d_gamma_ptr + cols, d_gamma.to(d_gamma_ptr.dtype.element_ty), mask=col_mask)
        count = M * 1.0
        if FROM_VAR:  # frozen statistics: dY = dP * scale
            mean_dp = tl.zeros_like(sum_dp)
            projection = tl.zeros_like(sum_dp)
            mean = tl.zeros_like(sum_dp)
        else:
            mean_dp = sum_dp / count
            projection = d_gamma * rstd / count
        tl.store(grad_ptr + _SCALE * grad_stride + cols, scale, mask=col_mask)
        tl.store(grad_ptr + _MEAN_DP * grad_stride + cols, mean_dp, mask=col_mask)
        tl.store(grad_ptr + _PROJECTION * grad_stride + cols, projection, mask=col_mask)
        tl.store(grad_ptr + _MEAN * grad_stride + cols, mean, mask=col_mask)


@triton.jit
def norm2_input_grad(dp, y, mask, grad_ptr, grad_stride, cols, col_mask, INTERPRETED: tl.constexpr):
    """norm2's input gradient ``dY`` for a tile of its channels ``cols`` (columns), from ``dP`` and the
    bottleneck ``Y`` (tiles in the compute dtype) and the four vectors ``conv3x3_dgrad`` left, rounded to the
    compute dtype as PyTorch's BatchNorm backward writes it; zero outside ``mask``."""
    scale = tl.load(grad_ptr + _SCALE * grad_stride + cols, mask=col_mask, other=0.0)
    mean_dp = tl.load(grad_ptr + _MEAN_DP * grad_stride + cols, mask=col_mask, other=0.0)
    projection = tl.load(grad_ptr + _PROJECTION * grad_stride + cols, mask=col_mask, other=0.0)
    mean = tl.load(grad_ptr + _MEAN * grad_stride + cols, mask=col_mask, other=0.0)
    centered = y.to(tl.float32) - mean[None, :]
    d_y = (dp.to(tl.float32) - mean_dp[None, :] - centered * projection[None, :]) * scale[None, :]
    return rounded(tl.where(mask, d_y, 0.0), dp.dtype, INTERPRETED)


# (the interpreter's: large tiles, few steps; the interpreter's cost is per operation, not per element)
_WGRAD_INTERPRET = triton.Config({"BLOCK_C": 64, "BLOCK_K": 32, "BLOCK_M": 64, "SPLIT_M": 2, "SPLIT_ROWS": 16})
# The nine (BLOCK_C x BLOCK_K) float32 accumulators stay in registers: 128 x 32 tiles on 8 warps hold 144 a
# thread, and the whole bottleneck width in one column tile reads the gradient's nine shifted tiles once
# (64-wide tiles read them twice). The products are act^T @ D_tap: BLOCK_C rows, as the tensor cores' M
# wants. A row step of 64 on 3 stages needed 280 KB of shared memory in float32 (its nine shifted D tiles
# are pipelined), so it runs on 2. Cost on sm_90 over bf16/fp16/fp32, batch and running statistics
# (compile_for_hopper.py --all, triton 3.8 and 3.6; no spills):
#   128x32 by 32 rows, 8 warps, 2 stages: 240-244 regs, 52-120 KB
#   64x32 by 32 rows, 8 warps, 3 stages: 146-164 regs, 66-140 KB
#   64x32 by 64 rows, 8 warps, 2 stages: 158-187 regs, 88-192 KB
#   float32 with TF32 off (FMA products), 64x32 by 16 rows, 8 warps, 3 stages: 149-156 regs, 48 KB
_WGRAD_CONFIGS = [
    split_config({"BLOCK_C": 128, "BLOCK_K": 32, "BLOCK_M": 32, "SPLIT_M": 64}, 8, 2),
    split_config({"BLOCK_C": 64, "BLOCK_K": 32, "BLOCK_M": 32, "SPLIT_M": 64}, 8, 3),
    split_config({"BLOCK_C": 64, "BLOCK_K": 32, "BLOCK_M": 64, "SPLIT_M": 64}, 8, 2),
]
_WGRAD_IEEE_CONFIGS = [
    split_config({"BLOCK_C": 64, "BLOCK_K": 32, "BLOCK_M": 16, "SPLIT_M": 64}, 8, 3),
]
_WGRAD_ALL = [*_WGRAD_CONFIGS, *_WGRAD_IEEE_CONFIGS, _WGRAD_INTERPRET]
_WGRAD_MAX_SPLIT = max(c.kwargs["SPLIT_M"] for c in _WGRAD_ALL)
_WGRAD_MIN_C, _WGRAD_MIN_K = smallest(_WGRAD_ALL, "BLOCK_C"), smallest(_WGRAD_ALL, "BLOCK_K")
# Splits summed by the last program of a group (the first level of the merge); the second level sums the groups.
WGRAD_GROUP = 8
_WGRAD_GROUP = tl.constexpr(WGRAD_GROUP)


@triton.jit
def _tap_product(acc, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, dh: tl.constexpr, dw: tl.constexpr,
                 INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """``acc += act^T @ D[rows - (dh, dw)]``: tap ``(dh, dw)``'s weight gradient from the activation rows this
    program holds and the output pixels that read them through that tap (none outside the image)."""
    inside = row_mask & (h - dh >= 0) & (h - dh < H) & (w - dw >= 0) & (w - dw < W)
    d = tl.load(d_ptr + row_offsets(rows - dh * W - dw, K)[:, None] + ks[None, :],
                mask=inside[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
    if INTERPRETED:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
        return tl.dot(act_t.to(tl.float32), d.to(tl.float32), acc)
    return tl.dot(act_t, d, acc, input_precision=PRECISION)


@triton.jit
def _store_tap(part_ptr, acc, base, ks, cols, mask, C, tap: tl.constexpr):
    """A tap's (BLOCK_C x BLOCK_K) partial at its place in a ``(K, C, 3, 3)`` float32 array at ``base``."""
    tl.store(part_ptr + base + ks[None, :] * (C * 9) + cols[:, None] * 9 + tap, acc, mask=mask)


@tuned(
    _WGRAD_CONFIGS,
    key=["C_BUCKET", "K", "M_BUCKET", "FROM_VAR"],
    interpret=_WGRAD_INTERPRET,
    ieee=_WGRAD_IEEE_CONFIGS,
)
@triton.jit
def _conv3x3_wgrad_kernel(
    d_ptr, y_ptr, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, part_ptr, counter_ptr, dw_ptr,
    M, C, K, H, W, C_BUCKET, M_BUCKET,
    FROM_VAR: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_M: tl.constexpr,
    SPLIT_ROWS: tl.constexpr,
):  # fmt: skip
    pid_c, pid_k, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask, k_mask = cols < C, ks < K
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.load(inv_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    if FROM_VAR:
        rstd = tl.div_rn(1.0, tl.sqrt_rn(rstd + eps))
    scale = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * rstd
    bias = tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    splits = tl.num_programs(2)  # SPLIT_M, or fewer for few rows (split_count)
    rows_per_split = tl.cdiv(tl.cdiv(M, splits), BLOCK_M) * BLOCK_M
    start = split * rows_per_split
    acc0 = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    acc1 = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    acc3 = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    acc4 = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    acc5 = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    acc6 = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    acc7 = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    acc8 = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    for m0 in range(0, rows_per_split, BLOCK_M):
        rows = start + m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        h = (rows // W) % H
        w = rows % W
        mask = row_mask[:, None] & col_mask[None, :]
        y = tl.load(y_ptr + row_offsets(rows, C)[:, None] + cols[None, :], mask=mask, other=0.0)
        act = tl.where(mask, bn_relu(y, mean, scale, bias, INTERPRETED), 0.0).to(y.dtype)  # the forward's A
        act_t = tl.trans(act)
        acc0 = _tap_product(acc0, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, -1, -1, INTERPRETED,
                            PRECISION)  # fmt: skip
        acc1 = _tap_product(acc1, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, -1, 0, INTERPRETED,
                            PRECISION)  # fmt: skip
        acc2 = _tap_product(acc2, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, -1, 1, INTERPRETED,
                            PRECISION)  # fmt: skip
        acc3 = _tap_product(acc3, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, 0, -1, INTERPRETED,
                            PRECISION)  # fmt: skip
        acc4 = _tap_product(acc4, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, 0, 0, INTERPRETED,
                            PRECISION)  # fmt: skip
        acc5 = _tap_product(acc5, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, 0, 1, INTERPRETED,
                            PRECISION)  # fmt: skip
        acc6 = _tap_product(acc6, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, 1, -1, INTERPRETED,
                            PRECISION)  # fmt: skip
        acc7 = _tap_product(acc7, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, 1, 0, INTERPRETED,
                            PRECISION)  # fmt: skip
        acc8 = _tap_product(acc8, act_t, d_ptr, rows, h, w, row_mask, ks, k_mask, H, W, K, 1, 1, INTERPRETED,
                            PRECISION)  # fmt: skip
    size = K * C * 9  # one split's partial: a float32 copy of the weight's gradient (split offsets stay int32)
    base = split * size
    tile_mask = col_mask[:, None] & k_mask[None, :]
    _store_tap(part_ptr, acc0, base, ks, cols, tile_mask, C, 0)
    _store_tap(part_ptr, acc1, base, ks, cols, tile_mask, C, 1)
    _store_tap(part_ptr, acc2, base, ks, cols, tile_mask, C, 2)
    _store_tap(part_ptr, acc3, base, ks, cols, tile_mask, C, 3)
    _store_tap(part_ptr, acc4, base, ks, cols, tile_mask, C, 4)
    _store_tap(part_ptr, acc5, base, ks, cols, tile_mask, C, 5)
    _store_tap(part_ptr, acc6, base, ks, cols, tile_mask, C, 6)
    _store_tap(part_ptr, acc7, base, ks, cols, tile_mask, C, 7)
    _store_tap(part_ptr, acc8, base, ks, cols, tile_mask, C, 8)
    # the splits' sum, merged by the last programs of this output tile: groups of splits, then the groups
    groups = tl.cdiv(splits, _WGRAD_GROUP)
    counter = counter_ptr + (pid_c * tl.num_programs(1) + pid_k) * (groups + 1)
    group = split // _WGRAD_GROUP
    first = group * _WGRAD_GROUP
    size_g = tl.minimum(splits - first, _WGRAD_GROUP)
    if arrive(counter + group, size_g):
        for tap in range(9):
            tile = ks[None, :] * (C * 9) + cols[:, None] * 9 + tap
            total = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
            for s in range(first, first + size_g):
                total += tl.load(part_ptr + s * size + tile, mask=tile_mask, other=0.0, cache_modifier=".cg")
            tl.store(part_ptr + first * size + tile, total, mask=tile_mask, cache_modifier=".cg")
        tl.store(counter + group, 0)
        if arrive(counter + groups, groups):
            for tap in range(9):
                tile = ks[None, :] * (C * 9) + cols[:, None] * 9 + tap
                total = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
                for g in range(0, groups):
                    total += tl.load(part_ptr + g * _WGRAD_GROUP * size + tile, mask=tile_mask, other=0.0,
                                     cache_modifier=".cg")  # fmt: skip
                tl.store(dw_ptr + tile, total.to(dw_ptr.dtype.element_ty), mask=tile_mask)
            tl.store(counter + groups, 0)


def dgrad_counters(m: int, c: int) -> int:
    """The arrival counters a ``conv3x3_dgrad`` launch over ``m`` rows and ``c`` bottleneck channels uses."""
    return counters_needed(cdiv(m, _DGRAD_MIN_BLOCK_M), cdiv(c, _DGRAD_MIN_BLOCK_N))


def wgrad_counters(c: int, k: int) -> int:
    """The arrival counters a ``conv3x3_wgrad`` launch for a ``(k, c, 3, 3)`` weight uses."""
    return cdiv(c, _WGRAD_MIN_C) * cdiv(k, _WGRAD_MIN_K) * (cdiv(_WGRAD_MAX_SPLIT, WGRAD_GROUP) + 1)


def backward_counters(m: int, c: int, k: int, need_weight: bool) -> int:
    """The counters ``conv3x3_norm2_backward`` uses (both launches)."""
    return dgrad_counters(m, c) + (wgrad_counters(c, k) if need_weight else 0)


def conv3x3_norm2_backward(
    d_new: Tensor,
    y: Tensor,
    norm,
    weight: Tensor,
    nhw: tuple[int, int, int],
    *,
    d_gamma: Tensor,
    d_beta: Tensor,
    d_weight: Tensor | None = None,
    pool: CounterPool | None = None,
) -> tuple[Tensor, Tensor]:
    """Backward of ``new = conv3x3(relu(norm(y)))`` from ``d_new`` (``M x k``, contiguous, compute dtype) to
    ``(dP, grad)``: norm2's output gradient ``dP`` (``M x C``, compute dtype) and its ``(4, C)`` float32 vectors
    (``SCALE``, ``MEAN_DP``, ``PROJECTION``, ``MEAN`` rows), from which ``norm2_input_grad`` forms ``dY``.

    y: the ``M x C`` contiguous bottleneck of ``nhw = (N, H, W)`` images. norm: norm2's ``NormMap`` (batch
    statistics, or with ``from_var`` running ones: then ``dY = dP * scale``). weight: ``(k, C, 3, 3)``,
    contiguous, compute dtype. Writes ``d_beta = sum(dP)``, ``d_gamma = sum(dP * yhat)`` (C vectors) and
    ``d_weight`` (``(k, C, 3, 3)``, any float dtype) when given."""
    check_kernel_tensors(d_new, y, weight)
    n, h, w = nhw
    m, c = y.shape
    k = weight.shape[0]
    check_rows(m, "conv3x3_norm2_backward")
    if m != n * h * w or not y.is_contiguous():
        raise ValueError(f"conv3x3_norm2_backward: y must be a contiguous {n * h * w} x C matrix, got {tuple(y.shape)}")
    if tuple(weight.shape) != (k, c, 3, 3) or not weight.is_contiguous():
        raise ValueError(f"conv3x3_norm2_backward: weight must be a contiguous ({k}, {c}, 3, 3), got "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if d_new.shape != (m, k) or not d_new.is_contiguous():
        raise ValueError(f"conv3x3_norm2_backward: d_new must be a contiguous {m} x {k} matrix")
    if d_weight is not None and (d_weight.shape != weight.shape or not d_weight.is_contiguous()):
        raise ValueError(f"conv3x3_norm2_backward: d_weight must be a contiguous {tuple(weight.shape)} array")
    if m == 0:
        raise ValueError("conv3x3_norm2_backward: no rows (the caller takes PyTorch's path for an empty batch)")
    d_pre = torch.empty((m, c), dtype=weight.dtype, device=y.device)
    grad = torch.empty((NORM2_GRAD_ROWS, c), dtype=torch.float32, device=y.device)
    mean, inv, gamma, beta, eps = norm_arguments(norm)
    partials = uninitialised(2, cdiv(m, _DGRAD_MIN_BLOCK_M), c, device=y.device)
    counter = take_counters(pool, backward_counters(m, c, k, d_weight is not None), y.device)
    precision = dot_precision(weight.dtype)
    from_var = bool(norm.from_var)

    def dgrad_grid(meta):
        return cdiv(m, meta["BLOCK_M"]), cdiv(c, meta["BLOCK_N"])

    _conv3x3_dgrad_kernel[dgrad_grid](
        d_new, weight, y, mean, inv, gamma, beta, float(eps), d_pre, partials[0], partials[1], counter,
        d_gamma, d_beta, grad, grad.stride(0), m, c, k, h, w, bucket(c), row_bucket(m),
        FROM_VAR=from_var, INTERPRETED=INTERPRET, PRECISION=precision, BLOCK_T=MERGE_ROWS,
    )  # fmt: skip
    if d_weight is not None:
        most = max(split_count(m, config.kwargs) for config in _WGRAD_ALL)  # no room for splits a launch never has
        splits = uninitialised(most, k * c * 9, device=y.device)

        def wgrad_grid(meta):
            return cdiv(c, meta["BLOCK_C"]), cdiv(k, meta["BLOCK_K"]), split_count(m, meta)

        _conv3x3_wgrad_kernel[wgrad_grid](
            d_new, y, mean, inv, gamma, beta, float(eps), splits, counter[dgrad_counters(m, c):], d_weight,
            m, c, k, h, w, bucket(c), row_bucket(m),
            FROM_VAR=from_var, INTERPRETED=INTERPRET, PRECISION=precision,
        )  # fmt: skip
    return d_pre, grad


def conv3x3_norm2_backward_reference(d_new, y, norm, weight, nhw, training: bool):
    """``conv3x3_norm2_backward`` with PyTorch ops, rounding where the kernels round (for the tests): returns
    ``(dP, dY, d_gamma, d_beta, d_weight)``, ``dY`` as ``norm2_input_grad`` forms it."""
    n, h, w = nhw
    mean, scale, bias = norm.vectors()
    rstd = norm.rstd().float()
    act = ((y.float() - mean) * scale + bias).to(y.dtype).float().relu()
    images = act.to(weight.dtype).float().view(n, h, w, -1).permute(0, 3, 1, 2)
    d_images = d_new.float().view(n, h, w, -1).permute(0, 3, 1, 2)
    d_act, d_w, _ = torch.ops.aten.convolution_backward(
        d_images, images, weight.float(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    d_act = d_act.permute(0, 2, 3, 1).reshape(n * h * w, -1).to(weight.dtype).float()
    dp = d_act * (act > 0)
    centered = y.float() - mean
    d_beta, d_gamma = dp.sum(0), (dp * centered).sum(0) * rstd
    rows = dp.shape[0]
    d_y = (dp - d_beta / rows - centered * (d_gamma * rstd / rows)) * scale if training else dp * scale
    return dp.to(weight.dtype), d_y.to(weight.dtype), d_gamma, d_beta, d_w


@_conv3x3_dgrad_kernel.planned
def _dgrad_plan(args: dict, meta: dict) -> Moved:
    """Each row tile reads, once per column tile, the gradient rows its nine taps reach inside the image; each
    column tile the whole weight once per row tile; the bottleneck tile and four vectors once; ``dP`` written
    once; two sums per column and row tile, merged by the last programs, which write norm2's two gradients
    and the four vectors of its input gradient."""
    d, y, w = args["d_ptr"], args["y_ptr"], args["w_ptr"]
    m, c, k, h, width = args["M"], args["C"], args["K"], args["H"], args["W"]
    row_tiles, col_tiles = cdiv(m, meta["BLOCK_M"]), cdiv(c, meta["BLOCK_N"])
    taps_inside = m // (h * width) * (3 * h - 2) * (3 * width - 2)
    w_bytes, vectors = 9 * c * k * w.element_size(), 4 * c * args["mean_ptr"].element_size()
    read = taps_inside * k * d.element_size() * col_tiles + w_bytes * row_tiles + m * c * y.element_size()
    read += vectors * row_tiles
    compulsory = m * k * d.element_size() + w_bytes + m * c * y.element_size() + vectors
    written = m * c * args["dp_ptr"].element_size()
    moved = Moved(read, written, 2 * m * 9 * k * c, read - compulsory)
    return moved + partials_moved(row_tiles, c, finals=2 + NORM2_GRAD_ROWS)


@_conv3x3_wgrad_kernel.planned
def _wgrad_plan(args: dict, meta: dict) -> Moved:
    """The bottleneck's rows once per tile of the gradient's channels, with four vectors per program; the
    gradient's rows nine times (a tap each, inside the image) per tile of the bottleneck's channels; every
    split writes its float32 partial of the weight's gradient, the first level's last programs read them and
    write one per group, the last reads those and writes the gradient."""
    m, c, k, h, width = args["M"], args["C"], args["K"], args["H"], args["W"]
    split = split_count(m, meta)
    c_tiles, k_tiles = cdiv(c, meta["BLOCK_C"]), cdiv(k, meta["BLOCK_K"])
    d_bytes, y_bytes = m * k * args["d_ptr"].element_size(), m * c * args["y_ptr"].element_size()
    taps_inside = m // (h * width) * (3 * h - 2) * (3 * width - 2)
    vectors = 4 * c * args["mean_ptr"].element_size()
    read = taps_inside * k * args["d_ptr"].element_size() * c_tiles + y_bytes * k_tiles + vectors * k_tiles * split
    groups = cdiv(split, WGRAD_GROUP)
    partial = 9 * k * c * 4
    merged = Moved((split + groups) * partial, (split + groups) * partial + 9 * k * c * args["dw_ptr"].element_size(),
                   0, groups * partial)  # fmt: skip
    return Moved(read, 0, 2 * m * 9 * k * c, read - (d_bytes + y_bytes + vectors)) + merged
