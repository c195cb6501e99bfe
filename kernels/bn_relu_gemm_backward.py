"""Backward of BN-ReLU-1x1 conv over the block buffer (DESIGN.md section 4), two kernels.

With ``u = (X[:, :C] - shift) * scale + bias`` recomputed from the buffer (never stored) and ``dY`` the
gradient of the layer's bottleneck:

* ``dgrad``: ``P = (dY @ W1) * [u > 0]`` (norm1's output gradient), accumulated straight into the
  block's fp32 gradient buffer as ``G[:, :C] += coef * P``, with norm1's per-channel sums
  ``sum(P)`` and ``sum(P * (X - mean))`` (its dbeta, and dgamma before the factor rstd) emitted as
  per-row-tile partials from the epilogue. Each program owns its G tile: no atomics, deterministic.
* ``wgrad``: ``dW1 = dY^T @ relu(u)``, a reduction over the M rows split into ``SPLIT_M`` ranges
  whose fp32 partials are summed on the host (deterministic: no atomics).

fp32 accumulation, int64 row offsets, every edge masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import cdiv

from .affine import bn_relu, load_affine
from .launch import (
    INTERPRET,
    Moved,
    bucket,
    check_kernel_tensors,
    check_rows,
    dot_precision,
    row_bucket,
    smallest,
    tuned,
    uninitialised,
    unit_columns,
)
from .offsets import row_offsets
from .tiles import dot_weight_rows, output_tile

_DGRAD_INTERPRET = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})
# Here N is the buffer prefix width C (up to ~1000) and the reduction runs over the 4k = 128 channels.
# The epilogue holds the product, the buffer tile, G's tile and their pointers at once: tiles of
# 128 x 64 or more take 8 warps (on 4 warps, and 128x128 on 8, bf16 spilled 250-450 B per thread).
# Cost on sm_90 over bf16/fp16/fp32 (compile_for_hopper.py --all, triton 3.8 and 3.6; no spills):
#   128x64x64, 8 warps, 3 stages: 138-189 regs, 72-144 KB
#   64x128x64, 8 warps, 3 stages: 137-187 regs, 72-144 KB
#   64x64x64,  4 warps, 3 stages: 138-180 regs, 48-96 KB
#   64x64x32,  4 warps, 4 stages: 142-185 regs, 32-64 KB
_DGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
# float32 with TF32 off (PRECISION="ieee"): FMA products; 128x64x64 spilled 8 B per thread there in
# triton 3.6, the other three do not (128-144 regs, 48-96 KB; compile_for_hopper.py --all --match ieee).
_DGRAD_IEEE_CONFIGS = _DGRAD_CONFIGS[1:]
_DGRAD_MIN_BLOCK_M = smallest([*_DGRAD_CONFIGS, _DGRAD_INTERPRET], "BLOCK_M")


@tuned(
    _DGRAD_CONFIGS,
    key=["N_BUCKET", "K", "M_BUCKET"],
    restore_value=["g_ptr"],
    interpret=_DGRAD_INTERPRET,
    ieee=_DGRAD_IEEE_CONFIGS,
)
@triton.jit
def _dgrad_kernel(
    dy_ptr, w_ptr, x_ptr, shift_ptr, scale_ptr, bias_ptr, mean_ptr, coef_ptr, g_ptr, sum_p_ptr, sum_px_ptr,
    M, N, K, stride_x, stride_g, N_BUCKET, M_BUCKET,
    INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    dy_rows = dy_ptr + row_offsets(rows, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):  # dY (M x K, contiguous) @ W1 (K x N, row-major)
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        dy = tl.load(dy_rows[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc = dot_weight_rows(acc, dy, w_ptr, ks, k_mask, cols, col_mask, N, INTERPRETED, PRECISION)

    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + row_offsets(rows, stride_x)[:, None] + cols[None, :], mask=mask, other=0.0)
    shift, scale, bias = load_affine(shift_ptr, scale_ptr, bias_ptr, cols, col_mask)
    active = bn_relu(x, shift, scale, bias, INTERPRETED) > 0  # norm1's ReLU mask, recomputed
    p = tl.where(mask & active, acc, 0.0)
    g_ptrs = g_ptr + row_offsets(rows, stride_g)[:, None] + cols[None, :]
    coef = tl.load(coef_ptr + cols, mask=col_mask, other=0.0)
    tl.store(g_ptrs, tl.load(g_ptrs, mask=mask, other=0.0) + p * coef[None, :], mask=mask)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    centered = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
    partial_row = tl.program_id(0).to(tl.int64) * N
    tl.store(sum_p_ptr + partial_row + cols, tl.sum(p, axis=0), mask=col_mask)
    tl.store(sum_px_ptr + partial_row + cols, tl.sum(p * centered, axis=0), mask=col_mask)


_WGRAD_INTERPRET = triton.Config({"BLOCK_N": 32, "BLOCK_C": 32, "BLOCK_M": 32, "SPLIT_M": 2})
# wgrad: 130-152, 96-148 and 116-140 registers per thread, 64-144 KB of shared memory (no spills).
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_C": 64, "BLOCK_M": 64, "SPLIT_M": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_M": 64, "SPLIT_M": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_C": 128, "BLOCK_M": 32, "SPLIT_M": 16}, num_warps=8, num_stages=3),
]
# float32 with TF32 off (PRECISION="ieee"): dY^T @ act on the FMA units spilled 4.6-11.3 KB per thread
# with the configurations above. Short row steps on 8 warps do not (compile_for_hopper.py --all --match
# ieee): 64x64 by 16 rows 128 regs, 128x64 by 16 rows 249, 64x64 by 32 rows 254; 20-41 KB.
_WGRAD_IEEE_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_M": 16, "SPLIT_M": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_C": 64, "BLOCK_M": 16, "SPLIT_M": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_M": 32, "SPLIT_M": 64}, num_warps=8, num_stages=3),
]
_WGRAD_MAX_SPLIT = max(c.kwargs["SPLIT_M"] for c in [*_WGRAD_CONFIGS, *_WGRAD_IEEE_CONFIGS, _WGRAD_INTERPRET])


@tuned(
    _WGRAD_CONFIGS,
    key=["N", "C_BUCKET", "M_BUCKET"],
    interpret=_WGRAD_INTERPRET,
    ieee=_WGRAD_IEEE_CONFIGS,
)
@triton.jit
def _wgrad_kernel(
    dy_ptr, x_ptr, shift_ptr, scale_ptr, bias_ptr, dw_ptr,
    M, N, C, stride_x, C_BUCKET, M_BUCKET,
    INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_M: tl.constexpr,
):  # fmt: skip
    pid_n, pid_c, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask, col_mask = ns < N, cols < C
    shift, scale, bias = load_affine(shift_ptr, scale_ptr, bias_ptr, cols, col_mask)
    rows_per_split = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M
    start = split * rows_per_split
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for m0 in range(0, rows_per_split, BLOCK_M):
        rows = start + m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        dy_mask = row_mask[:, None] & n_mask[None, :]
        dy = tl.load(dy_ptr + row_offsets(rows, N)[:, None] + ns[None, :], mask=dy_mask, other=0.0)
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + row_offsets(rows, stride_x)[:, None] + cols[None, :], mask=mask, other=0.0)
        act = tl.where(mask, bn_relu(x, shift, scale, bias, INTERPRETED), 0.0).to(dy.dtype)  # relu(norm1(x))
        if INTERPRETED:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
            acc = tl.dot(tl.trans(dy.to(tl.float32)), act.to(tl.float32), acc)
        else:
            acc = tl.dot(tl.trans(dy), act, acc, input_precision=PRECISION)
    out = dw_ptr + split.to(tl.int64) * N * C + ns[:, None] * C + cols[None, :]
    tl.store(out, acc, mask=n_mask[:, None] & col_mask[None, :])


def norm1_gemm_backward(
    d_y: Tensor,
    x: Tensor,
    norm: tuple[Tensor, Tensor, Tensor],
    mean: Tensor,
    coef: Tensor,
    weight: Tensor,
    grad_sum: Tensor,
    need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Backward of ``Y = relu(norm1(x)) @ weight^T`` over an ``M x C`` buffer prefix ``x``.

    d_y: ``M x 4k`` contiguous, in the compute dtype (``weight``'s). norm: ``(shift, scale, bias)`` of
    norm1's map (for the ReLU mask); mean: what ``x`` is centred by for the dgamma sum; coef: per-channel
    factor of ``P`` into ``grad_sum`` (``M x C_total`` float32, accumulated in place in its first C columns).
    Returns ``sum(P)``, ``sum(P * (x - mean))`` and ``dW = d_y^T @ relu(norm1(x))`` (None unless
    ``need_weight``), all float32.
    """
    check_kernel_tensors(d_y, x, weight, grad_sum)
    m, c = x.shape
    check_rows(m, "norm1_gemm_backward")
    k = weight.shape[0]
    if weight.shape != (k, c) or d_y.shape != (m, k) or not d_y.is_contiguous() or not unit_columns(x):
        raise ValueError(
            f"norm1_gemm_backward: shapes d_y {tuple(d_y.shape)}, x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if grad_sum.dtype != torch.float32 or not unit_columns(grad_sum) or grad_sum.shape[0] != m:
        raise ValueError("norm1_gemm_backward: grad_sum must be an M x C_total float32 matrix with unit column stride")
    weight = weight.contiguous()
    vectors = [v.to(torch.float32).contiguous() for v in (*norm, mean, coef)]
    # Partial results, uninitialised: room for the most any configuration writes; only the rows the launch
    # wrote (its configuration's row tiles, or splits) are summed.
    tiles = triton.cdiv(m, _DGRAD_MIN_BLOCK_M)
    sums = uninitialised(2, tiles, c, device=x.device)
    d_w = uninitialised(_WGRAD_MAX_SPLIT, k, c, device=x.device) if need_weight else None
    row_tiles = splits = 0
    if m > 0 and c > 0:
        precision = dot_precision(weight.dtype)

        def dgrad_grid(meta):
            return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"])

        _dgrad_kernel[dgrad_grid](
            d_y, weight, x, *vectors, grad_sum, sums[0], sums[1],
            m, c, k, x.stride(0), grad_sum.stride(0), bucket(c), row_bucket(m),
            INTERPRETED=INTERPRET, PRECISION=precision,
        )  # fmt: skip
        row_tiles = dgrad_grid(_dgrad_kernel.last_config.kwargs)[0]
        if need_weight:

            def wgrad_grid(meta):
                return triton.cdiv(k, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_C"]), meta["SPLIT_M"]

            _wgrad_kernel[wgrad_grid](
                d_y, x, *vectors[:3], d_w, m, k, c, x.stride(0), bucket(c), row_bucket(m),
                INTERPRETED=INTERPRET, PRECISION=precision,
            )  # fmt: skip
            splits = _wgrad_kernel.last_config.kwargs["SPLIT_M"]
    total = sums[:, :row_tiles].sum(1)
    return total[0], total[1], None if d_w is None else d_w[:splits].sum(0)


def norm1_gemm_backward_reference(d_y, x, norm, mean, coef, weight, grad_sum, need_weight):
    """``norm1_gemm_backward`` with PyTorch ops (for the tests)."""
    shift, scale, bias = norm
    act = ((x.float() - shift) * scale + bias).to(x.dtype).float().relu()
    p = (d_y.float() @ weight.float()) * (act > 0)
    grad_sum[:, : x.shape[1]] += p * coef
    d_w = d_y.float().t() @ act.to(d_y.dtype).float() if need_weight else None
    return p.sum(0), (p * (x.float() - mean)).sum(0), d_w


@_dgrad_kernel.planned
def _dgrad_plan(args: dict, meta: dict) -> Moved:
    """Each row tile reads its rows of dY once per column tile (the K-loop), each column tile all of W once
    per row tile; the buffer tile, G's tile (read and written back) and five vectors once; two sums per
    column and row tile out."""
    m, n, k = args["M"], args["N"], args["K"]
    row_tiles, col_tiles = cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])
    dy_bytes, w_bytes = m * k * args["dy_ptr"].element_size(), k * n * args["w_ptr"].element_size()
    once = m * n * (args["x_ptr"].element_size() + 4)
    read = dy_bytes * col_tiles + w_bytes * row_tiles + once + 5 * 4 * n * row_tiles
    compulsory_read = dy_bytes + w_bytes + once + 5 * 4 * n
    return Moved(read, m * n * 4 + 2 * 4 * n * row_tiles, 2 * m * k * n, read - compulsory_read)


@_wgrad_kernel.planned
def _wgrad_plan(args: dict, meta: dict) -> Moved:
    """dY's rows once per tile of the buffer's columns, the buffer's once per tile of dY's; every split
    writes its N x C float32 partial."""
    m, n, c, split = args["M"], args["N"], args["C"], meta["SPLIT_M"]
    n_tiles, c_tiles = cdiv(n, meta["BLOCK_N"]), cdiv(c, meta["BLOCK_C"])
    dy_bytes, x_bytes = m * n * args["dy_ptr"].element_size(), m * c * args["x_ptr"].element_size()
    read = dy_bytes * c_tiles + x_bytes * n_tiles + 3 * 4 * c * n_tiles * split
    return Moved(read, split * n * c * 4, 2 * m * n * c, read - (dy_bytes + x_bytes + 3 * 4 * c))
