"""BN-ReLU-1x1 conv as one GEMM over a column prefix of the block buffer (DESIGN.md section 3).

``Y = relu(X[:, :K] * a + b) @ W^T`` with ``X`` an ``M x K`` row-major matrix of any row stride (the
buffer's leading dimension is ``C_total``). The BatchNorm map and the ReLU are applied to each A tile
right after it is loaded, so the normalised activations never exist in memory. Optional parts:

* ``pool=True`` (transitions): output row ``m`` averages the 2x2 window of input rows below it before
  the product; exact because the 1x1 conv and the average pool are both linear.
* ``epilogue`` (eval mode): norm2's folded map and ReLU applied to the output tile, so the layer's
  3x3 conv reads finished activations.
* ``stats=True`` (training): per-column count/mean/M2 partials of the output tile for norm2's batch
  statistics, merged by ``kernels.stats.merge_partials``.

fp32 accumulation; row offsets in int64 (``M * C_total`` passes 2^31 at realistic sizes); every edge
masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import cdiv

from .affine import bn_relu, load_affine, rounded
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
    unit_columns,
)
from .offsets import row_offsets
from .stats import empty_partials, merge_partials, no_partials, written
from .tiles import dot_weight_rows, output_tile, store_tile_statistics

_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})
# Hopper: the bottleneck width N = 4k is 128 (DenseNet-121/169/201) or 192 (161); K runs to ~1000.
# What each costs on sm_90 over bf16/fp16/fp32 and the epilogue variants (tests/compile_for_hopper.py
# --all, triton 3.8 and 3.6; no configuration spills): registers per thread, shared memory per block
# (the pipeline's A and B tiles times num_stages; bf16 the low end, fp32 the high end, of 227 KB).
#   128x128x64, 8 warps, 3 stages: 130-226 regs,  81-161 KB
#   128x64x64,  4 warps, 4 stages: 147-255 regs,  82-162 KB (fp32 reaches the cap, unspilled)
#   64x128x64,  4 warps, 4 stages: 128-248 regs,  90-178 KB
#   128x128x32, 4 warps, 4 stages: 207-255 regs,  57-113 KB (fp32 reaches the cap, unspilled)
#   64x64x32,   4 warps, 5 stages:  72-116 regs,  37-73 KB
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=5),
]
# float32 with TF32 off (PRECISION="ieee") multiplies on the FMA units: the accumulator and both operand
# tiles live in registers, and every configuration above with a 64-wide K step or 4 warps on a 128-row
# tile spilled (24-280 B per thread), and 64x64x32 on 5 or 4 stages 8 B in triton 3.6. Cost on sm_90
# (compile_for_hopper.py --all --match ieee, triton 3.8 and 3.6; no spills):
#   128x64x32,  8 warps, 3 stages: 104-110 regs, 65 KB
#   64x128x32,  8 warps, 3 stages: 106-114 regs, 57 KB
#   128x128x32, 8 warps, 3 stages: 192-198 regs, 81 KB
#   64x64x32,   4 warps, 3 stages:  95-96 regs,  41 KB
_IEEE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
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
_MIN_BLOCK_M = smallest([*_CONFIGS, *_IEEE_CONFIGS, *_POOL_CONFIGS, _INTERPRET_CONFIG], "BLOCK_M")


@triton.jit
def _load_pooled_rows(x_ptr, rows, row_mask, ks, k_mask, stride_x, H, W, shift, scale, bias, INTERPRETED: tl.constexpr):
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
        total += bn_relu(x, shift, scale, bias, INTERPRETED)
    return rounded(total * 0.25, x.dtype, INTERPRETED)


@triton.jit
def _bn_relu_gemm(
    x_ptr, shift_ptr, scale_ptr, bias_ptr, w_ptr, y_ptr,
    shift2_ptr, scale2_ptr, bias2_ptr, mean_ptr, m2_ptr, count_ptr,
    M, N, K, stride_x, stride_y, H, W, M_BUCKET, K_BUCKET,
    POOL: tl.constexpr, EPILOGUE: tl.constexpr, STATS: tl.constexpr,
    INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    x_rows = x_ptr + row_offsets(rows, stride_x)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        shift, scale, bias = load_affine(shift_ptr, scale_ptr, bias_ptr, ks, k_mask)
        if POOL:
            act = _load_pooled_rows(x_ptr, rows, row_mask, ks, k_mask, stride_x, H, W, shift, scale, bias, INTERPRETED)
        else:
            mask = row_mask[:, None] & k_mask[None, :]
            x = tl.load(x_rows[:, None] + ks[None, :], mask=mask, other=0.0)
            act = bn_relu(x, shift, scale, bias, INTERPRETED).to(x.dtype)
        acc = dot_weight_rows(acc, act, w_ptr, ks, k_mask, cols, col_mask, N, INTERPRETED, PRECISION)  # W^T: K x N

    y = rounded(acc, y_ptr.dtype.element_ty, INTERPRETED)
    if EPILOGUE:  # eval: norm2 (folded running statistics) and relu2 on the finished tile
        shift2, scale2, bias2 = load_affine(shift2_ptr, scale2_ptr, bias2_ptr, cols, col_mask)
        y = bn_relu(y, shift2, scale2, bias2, INTERPRETED).to(y.dtype)
    y_rows = y_ptr + row_offsets(rows, stride_y)
    tl.store(y_rows[:, None] + cols[None, :], y, mask=row_mask[:, None] & col_mask[None, :])
    if STATS:  # training: norm2's statistics of the rounded outputs, as BatchNorm sees them
        store_tile_statistics(y, row_mask, cols, col_mask, mean_ptr, m2_ptr, count_ptr, N)


def _tuned(configs, name, ieee=None):
    # The epilogue variants (eval's norm2, training's statistics) are other kernels: tuned apart.
    return tuned(
        configs, key=["N", "M_BUCKET", "K_BUCKET", "EPILOGUE", "STATS"],
        interpret=_INTERPRET_CONFIG, ieee=ieee, name=name,
    )(_bn_relu_gemm)  # fmt: skip


# One kernel, two sets of configurations: a dense layer's GEMM and the pooled transition.
_bn_relu_gemm_kernel = _tuned(_CONFIGS, "bn_relu_gemm", _IEEE_CONFIGS)
_pooled_gemm_kernel = _tuned(_POOL_CONFIGS, "pooled_gemm")


def bn_relu_gemm(
    x: Tensor,
    norm: tuple[Tensor, Tensor, Tensor],
    weight: Tensor,
    *,
    epilogue: tuple[Tensor, Tensor, Tensor] | None = None,
    stats: bool = False,
    pool_hw: tuple[int, int] | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``relu(x * a + b) @ weight^T`` (see the module docstring).

    x: ``M x K`` with unit column stride (a column prefix of a buffer); with ``pool_hw=(H, W)`` it holds
    ``N*H*W`` rows of channels_last images and the output has ``N*(H//2)*(W//2)`` rows.
    norm, epilogue: ``(shift, scale, bias)`` float32 vectors (``kernels.affine.affine_vectors``).
    weight: ``N_out x K`` in the compute dtype (a 1x1 conv weight viewed as a matrix).
    out: optional ``rows x N_out`` destination with unit column stride (e.g. a buffer slice).
    Returns the output and, with ``stats``, the biased variance and mean of its columns.
    """
    check_kernel_tensors(x, weight)
    m_in, k = x.shape
    check_rows(m_in, "bn_relu_gemm")
    n_out = weight.shape[0]
    if weight.shape != (n_out, k):
        raise ValueError(
            f"bn_relu_gemm: weight must be {n_out} x {k} to match x's {k} columns, got {tuple(weight.shape)}"
        )
    if not unit_columns(x):
        raise ValueError(f"bn_relu_gemm: x must have unit column stride, got strides {x.stride()}")
    h, w = pool_hw or (1, 1)
    m = m_in if pool_hw is None else (m_in // (h * w)) * (h // 2) * (w // 2)
    if out is None:
        out = torch.empty((m, n_out), dtype=weight.dtype, device=x.device)
    if out.shape != (m, n_out) or not unit_columns(out):
        raise ValueError(f"bn_relu_gemm: out must be {m} x {n_out} with unit column stride, got {tuple(out.shape)}")
    w_t = weight.t().contiguous()  # K x N: small, rows of the B operand contiguous
    partials = empty_partials(triton.cdiv(m, _MIN_BLOCK_M), n_out, x.device) if stats else no_partials(x.device)
    second = epilogue if epilogue is not None else norm  # unused pointers when there is no epilogue
    kernel = _bn_relu_gemm_kernel if pool_hw is None else _pooled_gemm_kernel
    row_tiles = 0  # the partial rows the launch writes
    if m > 0:

        def grid(meta):
            return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_N"])

        kernel[grid](
            x, *norm, w_t, out, *second, *partials,
            m, n_out, k, x.stride(0), out.stride(0), h, w, row_bucket(m), bucket(k),
            POOL=pool_hw is not None, EPILOGUE=epilogue is not None, STATS=stats,
            INTERPRETED=INTERPRET, PRECISION=dot_precision(weight.dtype),
        )  # fmt: skip
        row_tiles = grid(kernel.last_config.kwargs)[0]
    return out, merge_partials(*written(partials, row_tiles)) if stats else None


def bn_relu_gemm_reference(x, norm, weight, *, epilogue=None, pool_hw=None):
    """``bn_relu_gemm`` with PyTorch ops, rounding where the kernel rounds (for the tests)."""

    def apply(v, vectors):
        shift, scale, bias = vectors
        return ((v.float() - shift) * scale + bias).to(v.dtype).relu()

    act = apply(x, norm)
    if pool_hw is not None:
        h, w = pool_hw
        images = act.float().view(-1, h, w, x.shape[1]).permute(0, 3, 1, 2)
        act = torch.nn.functional.avg_pool2d(images, 2).permute(0, 2, 3, 1).reshape(-1, x.shape[1]).to(x.dtype)
    y = (act.to(weight.dtype).float() @ weight.float().t()).to(weight.dtype)
    return apply(y, epilogue) if epilogue is not None else y


@_bn_relu_gemm_kernel.planned
@_pooled_gemm_kernel.planned
def _gemm_plan(args: dict, meta: dict) -> Moved:
    """Each of the grid's row tiles reads its rows of ``x`` (four window rows each when pooled) once per
    column tile, with the K-long BatchNorm vectors; each column tile reads all of W once per row tile; the
    output is written once, with one count, mean and M2 partial per column and row tile in training."""
    x, w, y = args["x_ptr"], args["w_ptr"], args["y_ptr"]
    m, n, k = args["M"], args["N"], args["K"]
    row_tiles, col_tiles = cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])
    rows_in = 4 * m if args["POOL"] else m
    x_bytes, w_bytes, vectors = rows_in * k * x.element_size(), k * n * w.element_size(), 3 * 4 * k
    epilogue = 3 * 4 * n if args["EPILOGUE"] else 0
    read = x_bytes * col_tiles + w_bytes * row_tiles + vectors * row_tiles * col_tiles + epilogue * row_tiles
    written = m * n * y.element_size() + (row_tiles * (2 * n + col_tiles) * 4 if args["STATS"] else 0)
    compulsory_read = x_bytes + w_bytes + vectors + epilogue
    return Moved(read, written, 2 * m * k * n, read - compulsory_read)
