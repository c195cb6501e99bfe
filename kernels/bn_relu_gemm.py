"""BN-ReLU-1x1 conv as one GEMM over a column prefix of the block buffer (docs/design.md section 3).

``Y = relu(X[:, :K] * a + b) @ W^T`` with ``X`` an ``M x K`` row-major matrix of any row stride (the
buffer's leading dimension is ``C_total``). The BatchNorm map and the ReLU are applied to each A tile
right after it is loaded, so the normalised activations never exist in memory. Optional parts:

* ``pool=True`` (transitions): output row ``m`` averages the 2x2 window of input rows below it before
  the product; exact because the 1x1 conv and the average pool are both linear.
* ``epilogue`` (eval mode): norm2's map (running statistics) and ReLU applied to the output tile, so the
  layer's 3x3 conv reads finished activations.
* ``stats`` (training): the output's per-column batch mean, rstd and variance (norm2's), from per-tile
  partials that the launch's last programs merge (``kernels.last_program``): no second launch.

The weight is read where it lies (a 1x1 conv's ``(N, K)`` rows) and the BatchNorm maps as they are stored
(``kernels.affine``): nothing is prepared for a launch.

fp32 accumulation; row offsets in int64 (``M * C_total`` passes 2^31 at realistic sizes); every edge
masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .affine import bn_relu, load_norm, norm_arguments, rounded
from .last_program import CounterPool, counters_needed, take_counters
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
    tuned,
    unit_columns,
)
from .offsets import row_offsets
from .stats import MERGE_ROWS, check_statistics_out, empty_batch_statistics, empty_partials, no_partials, partials_moved
from .tiles import dot_weight, output_tile, tile_statistics

_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})
# Hopper: the bottleneck width N = 4k is 128 (DenseNet-121/169/201) or 192 (161); K runs to ~1000.
# What each costs on sm_90 over bf16/fp16/fp32 and the epilogue variants (tests/compile_for_hopper.py
# --all, triton 3.8 and 3.6; no configuration spills): registers per thread, shared memory per block
# (the pipeline's A and B tiles times num_stages; bf16 the low end, fp32 the high end, of 227 KB).
#   128x128x64, 8 warps, 3 stages: 130-226 regs,  81-161 KB
#   128x64x64,  4 warps, 4 stages: 147-255 regs,  82-162 KB (fp32 reaches the cap, unspilled)
#   64x128x64,  4 warps, 4 stages: 128-248 regs,  90-178 KB
#   128x128x32, 8 warps, 4 stages: 120-222 regs,  57-146 KB (on 4 warps fp32 with statistics spilled 8 B)
#   64x64x32,   4 warps, 5 stages:  72-116 regs,  37-73 KB
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=5),
]
# float32 with TF32 off (PRECISION="ieee") multiplies on the FMA units: the accumulator and both operand
# tiles live in registers, and every configuration above with a 64-wide K step or 4 warps on a 128-row
# tile spilled (24-280 B per thread), and 64x64x32 on 5 or 4 stages 8 B in triton 3.6; once the prologue
# formed its map from the stored statistics, 128x64x32 and 64x128x32 on 8 warps spilled 8 B in triton 3.6
# too (ptxas held them to 128 registers): their K step is 16 now. Cost on sm_90 (compile_for_hopper.py
# --all --match ieee, triton 3.8 and 3.6; no spills):
#   128x64x16,  4 warps, 3 stages: 240-254 regs, 33 KB
#   64x128x16,  8 warps, 3 stages: 128 regs,     29 KB
#   128x128x32, 8 warps, 3 stages: 192-198 regs, 81 KB
#   64x64x32,   4 warps, 3 stages:  95-96 regs,  41 KB
_IEEE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]
# The pooled transition loads four A tiles (the 2x2 window) per step, and the pipeline buffers each of
# them num_stages times: fewer stages and more warps than the layer GEMM keep it within shared memory
# (with the layer's configurations fp32 needed up to 461 KB) and without spills (the layer's 128x64x64
# on 4 warps spilled 112 B per thread in bf16); with TF32 off too (168-255 regs, no spills):
#   128x128x32, 8 warps, 2 stages: 154-208 regs, 48-96 KB
#   64x128x64,  8 warps, 2 stages: 135-254 regs, 64-128 KB
#   128x64x32,  8 warps, 3 stages: 114-169 regs, 76-152 KB
#   64x64x32,   4 warps, 3 stages: 116-168 regs, 44-88 KB
_POOL_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]
_ALL_CONFIGS = [*_CONFIGS, *_IEEE_CONFIGS, *_POOL_CONFIGS, _INTERPRET_CONFIG]
_MIN_BLOCK_M, _MIN_BLOCK_N = smallest(_ALL_CONFIGS, "BLOCK_M"), smallest(_ALL_CONFIGS, "BLOCK_N")


@triton.jit
def _load_pooled_rows(x_ptr, rows, row_mask, ks, k_mask, stride_x, H, W, mean, scale, bias, INTERPRETED: tl.constexpr):
    """relu(bn(x)) averaged over the 2x2 input window of each output row (floor-mode pooling)."""
    h_out, w_out = H // 2, W // 2
    image = rows // (h_out * w_out)
    pixel = rows % (h_out * w_out)
    top_left = (image * H + 2 * (pixel // w_out)) * W + 2 * (pixel % w_out)
    mask = row_mask[:, None] & k_mask[None, :]
    total = tl.zeros((rows.shape[0], ks.shape[0]), tl.float32)
    for corner in tl.static_range(4):
        src = row_offsets(top_left + (corner // 2) * W + (corner % 2), stride_x)
        x = tl.load(x_ptr + src[:, None] + ks[None, :], mask=mask, other=0.0)
        total += bn_relu(x, mean, scale, bias, INTERPRETED)
    return rounded(total * 0.25, x.dtype, INTERPRETED)


@triton.jit
def _bn_relu_gemm(
    x_ptr, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, w_ptr, y_ptr,
    mean2_ptr, inv2_ptr, gamma2_ptr, beta2_ptr, eps2,
    part_mean_ptr, part_m2_ptr, counter_ptr, stats_ptr, stats_stride, stats_eps,
    M, N, K, stride_x, stride_y, H, W, M_BUCKET, K_BUCKET,
    POOL: tl.constexpr, EPILOGUE: tl.constexpr, STATS: tl.constexpr, FROM_VAR: tl.constexpr,
    INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    x_rows = x_ptr + row_offsets(rows, stride_x)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        mean, scale, bias = load_norm(mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, ks, k_mask, FROM_VAR)
        if POOL:
            act = _load_pooled_rows(x_ptr, rows, row_mask, ks, k_mask, stride_x, H, W, mean, scale, bias, INTERPRETED)
        else:
            mask = row_mask[:, None] & k_mask[None, :]
            x = tl.load(x_rows[:, None] + ks[None, :], mask=mask, other=0.0)
            act = bn_relu(x, mean, scale, bias, INTERPRETED).to(x.dtype)
        acc = dot_weight(acc, act, w_ptr, ks, k_mask, cols * K, col_mask, INTERPRETED, PRECISION)  # W: N x K rows

    y = rounded(acc, y_ptr.dtype.element_ty, INTERPRETED)
    if EPILOGUE:  # eval: norm2 (its running statistics) and relu2 on the finished tile
        mean2, scale2, bias2 = load_norm(mean2_ptr, inv2_ptr, gamma2_ptr, beta2_ptr, eps2, cols, col_mask, True)
        y = bn_relu(y, mean2, scale2, bias2, INTERPRETED).to(y.dtype)
    y_rows = y_ptr + row_offsets(rows, stride_y)
    tl.store(y_rows[:, None] + cols[None, :], y, mask=row_mask[:, None] & col_mask[None, :])
    if STATS:  # training: norm2's statistics of the rounded outputs, as BatchNorm sees them
        tile_statistics(y, row_mask, cols, col_mask, part_mean_ptr, part_m2_ptr, counter_ptr, stats_ptr,
                        stats_stride, stats_eps, M, N, BLOCK_M, BLOCK_T)  # fmt: skip


def _tuned(configs, name, ieee=None):
    # The epilogue variants (eval's norm2, training's statistics) are other kernels: tuned apart.
    return tuned(
        configs, key=["N", "M_BUCKET", "K_BUCKET", "EPILOGUE", "STATS"],
        interpret=_INTERPRET_CONFIG, ieee=ieee, name=name,
    )(_bn_relu_gemm)  # fmt: skip


# One kernel, two sets of configurations: a dense layer's GEMM and the pooled transition.
_bn_relu_gemm_kernel = _tuned(_CONFIGS, "bn_relu_gemm", _IEEE_CONFIGS)
_pooled_gemm_kernel = _tuned(_POOL_CONFIGS, "pooled_gemm")


def gemm_counters(m: int, n: int) -> int:
    """The arrival counters a launch with statistics of an ``m x n`` output uses (``CounterPool``)."""
    return counters_needed(cdiv(m, _MIN_BLOCK_M), cdiv(n, _MIN_BLOCK_N))


def bn_relu_gemm(
    x: Tensor,
    norm,
    weight: Tensor,
    *,
    epilogue=None,
    stats: Tensor | None = None,
    stats_eps: float = 0.0,
    pool_hw: tuple[int, int] | None = None,
    out: Tensor | None = None,
    pool: CounterPool | None = None,
) -> Tensor:
    """``relu(norm(x)) @ weight^T`` (see the module docstring); returns the output.

    x: ``M x K`` with unit column stride (a column prefix of a buffer); with ``pool_hw=(H, W)`` it holds
    ``N*H*W`` rows of channels_last images and the output has ``N*(H//2)*(W//2)`` rows.
    norm, epilogue: ``fastdense.batchnorm.NormMap``s (the epilogue's from running statistics: eval mode).
    weight: ``N_out x K`` (or a 1x1 conv's ``N_out x K x 1 x 1``), contiguous, in the compute dtype.
    stats: a float32 ``(3, N_out)`` view that receives the output's column mean, ``1 / sqrt(var + stats_eps)``
    and biased variance. out: optional ``rows x N_out`` destination with unit column stride (e.g. a
    buffer slice). pool: the counters' pool (a dense block's), else the launch zeroes its own.
    """
    check_kernel_tensors(x, weight)
    m_in, k = x.shape
    check_rows(m_in, "bn_relu_gemm")
    n_out = weight.shape[0]
    if weight.numel() != n_out * k or not weight.is_contiguous():
        raise ValueError(
            f"bn_relu_gemm: weight must be a contiguous {n_out} x {k} matrix to match x's {k} columns, "
            f"got {tuple(weight.shape)}"
        )
    if not unit_columns(x):
        raise ValueError(f"bn_relu_gemm: x must have unit column stride, got strides {x.stride()}")
    h, w = pool_hw or (1, 1)
    m = m_in if pool_hw is None else (m_in // (h * w)) * (h // 2) * (w // 2)
    if out is None:
        out = torch.empty((m, n_out), dtype=weight.dtype, device=x.device)
    if out.shape != (m, n_out) or not unit_columns(out):
        raise ValueError(f"bn_relu_gemm: out must be {m} x {n_out} with unit column stride, got {tuple(out.shape)}")
    if stats is not None:
        check_statistics_out(stats, n_out, "bn_relu_gemm")
        if m == 0:
            empty_batch_statistics(stats, stats_eps)
    if m == 0:
        return out
    with_stats = stats is not None
    partials = empty_partials(cdiv(m, _MIN_BLOCK_M), n_out, x.device) if with_stats else no_partials(x.device)
    counter = take_counters(pool, gemm_counters(m, n_out), x.device) if with_stats else partials[0]
    second = norm_arguments(epilogue) if epilogue is not None else norm_arguments(norm)  # unused without one
    kernel = _bn_relu_gemm_kernel if pool_hw is None else _pooled_gemm_kernel

    def grid(meta):
        return cdiv(m, meta["BLOCK_M"]), cdiv(n_out, meta["BLOCK_N"])

    kernel[grid](
        x, *norm_arguments(norm), weight, out, *second, *partials, counter,
        stats if with_stats else out, stats.stride(0) if with_stats else 0, float(stats_eps),
        m, n_out, k, x.stride(0), out.stride(0), h, w, row_bucket(m), bucket(k),
        POOL=pool_hw is not None, EPILOGUE=epilogue is not None, STATS=with_stats, FROM_VAR=bool(norm.from_var),
        INTERPRETED=INTERPRET, PRECISION=dot_precision(weight.dtype), BLOCK_T=MERGE_ROWS,
    )  # fmt: skip
    return out


def bn_relu_gemm_reference(x, norm, weight, *, epilogue=None, pool_hw=None):
    """``bn_relu_gemm`` with PyTorch ops, rounding where the kernel rounds (for the tests)."""

    def apply(v, map_):
        mean, scale, bias = map_.vectors()
        return ((v.float() - mean) * scale + bias).to(v.dtype).relu()

    act = apply(x, norm)
    if pool_hw is not None:
        h, w = pool_hw
        images = act.float().view(-1, h, w, x.shape[1]).permute(0, 3, 1, 2)
        act = torch.nn.functional.avg_pool2d(images, 2).permute(0, 2, 3, 1).reshape(-1, x.shape[1]).to(x.dtype)
    y = (act.to(weight.dtype).float() @ weight.float().reshape(weight.shape[0], -1).t()).to(weight.dtype)
    return apply(y, epilogue) if epilogue is not None else y


@_bn_relu_gemm_kernel.planned
@_pooled_gemm_kernel.planned
def _gemm_plan(args: dict, meta: dict) -> Moved:
    """Each of the grid's row tiles reads its rows of ``x`` (four window rows each when pooled) once per
    column tile, with the BatchNorm's four K-long vectors; each column tile reads all of W once per row tile;
    the output is written once, with its statistics' partials and their merge in training."""
    x, w, y = args["x_ptr"], args["w_ptr"], args["y_ptr"]
    m, n, k = args["M"], args["N"], args["K"]
    row_tiles, col_tiles = cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])
    rows_in = 4 * m if args["POOL"] else m
    x_bytes, w_bytes = rows_in * k * x.element_size(), k * n * w.element_size()
    vectors = 4 * k * args["mean_ptr"].element_size()
    epilogue = 4 * n * args["mean2_ptr"].element_size() if args["EPILOGUE"] else 0
    read = x_bytes * col_tiles + w_bytes * row_tiles + vectors * row_tiles * col_tiles + epilogue * row_tiles
    compulsory_read = x_bytes + w_bytes + vectors + epilogue
    moved = Moved(read, m * n * y.element_size(), 2 * m * k * n, read - compulsory_read)
    return moved + partials_moved(row_tiles, n) if args["STATS"] else moved
