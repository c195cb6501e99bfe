"""3x3 convolution (stride 1, padding 1) as an implicit GEMM that writes into the block buffer.

``new = conv3x3(relu(norm2(Y)))`` for a layer's ``M x C`` bottleneck ``Y`` (channels_last rows): the
reduction runs over the 9 taps times ``C`` channels; each A tile is the bottleneck shifted by one tap,
zero outside the image (the padding applies to the activation, after norm2 and the ReLU), with the
norm2-ReLU map applied right after the load (the prologue), so the activation never exists in memory.
The epilogue multiplies by the dropout noise when given, stores the ``k`` new channels straight into
the buffer's column slice and, in training, gives that segment's batch statistics (partials merged by the
launch's last programs, ``kernels.last_program``). The weight is read where it lies, ``(k, C, 3, 3)``.
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

_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32})
# Hopper: N = k = 32 (48 for DenseNet-161) new channels; the reduction is 9 * 4k = 1152 (1728) long.
# The norm2-ReLU prologue goes through registers (a whole A tile and its pointers per thread), so every
# configuration takes 8 warps: on 4 warps fp32 spilled (triton 3.6: 8-56 B per thread). Cost on sm_90
# over bf16/fp16/fp32 and the variants (compile_for_hopper.py --all, triton 3.8 and 3.6; no spills):
#   128x32x64, 4 stages:  70-212 regs,  80-194 KB
#   64x32x128, 3 stages:  62-246 regs,  72-163 KB
#   128x64x64, 4 stages:  93-239 regs,  96-226 KB (fp32 in 3.8 fills the 227 KB a block has)
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
]
# float32 with TF32 off (PRECISION="ieee"): FMA products, operands and accumulator in registers. The
# configurations above spilled there (8-40 B per thread), and so, once the statistics epilogue merged its own
# partials and the prologue formed its map from the stored statistics, did every other tile tried, in triton
# 3.6 or 3.8 or both (128x64 by 64 or 32 on 4 or 8 warps, 64x64x32 and 64x32x32 on 4 warps; ptxas held some
# to 128 registers). One configuration, then, that does not (compile_for_hopper.py --all --match ieee):
#   64x64x64, 8 warps, 3 stages: 109-212 regs, 64-82 KB
_IEEE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
_ALL_CONFIGS = [*_CONFIGS, *_IEEE_CONFIGS, _INTERPRET_CONFIG]
_MIN_BLOCK_M, _MIN_BLOCK_N = smallest(_ALL_CONFIGS, "BLOCK_M"), smallest(_ALL_CONFIGS, "BLOCK_N")


@tuned(
    _CONFIGS,
    key=["N", "C", "M_BUCKET", "PROLOGUE", "DROPOUT", "STATS"],
    interpret=_INTERPRET_CONFIG,
    ieee=_IEEE_CONFIGS,
)
@triton.jit
def _conv3x3_kernel(
    y_ptr, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, w_ptr, out_ptr, noise_ptr,
    part_mean_ptr, part_m2_ptr, counter_ptr, stats_ptr, stats_stride, stats_eps,
    M, N, C, H, W, stride_out, M_BUCKET,
    PROLOGUE: tl.constexpr, DROPOUT: tl.constexpr, STATS: tl.constexpr, FROM_VAR: tl.constexpr,
    INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    h = (rows // W) % H
    w = rows % W
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tap in range(9):  # a loop, not unrolled: 9 copies of the channel loop compile slowly
        dh, dw = tap // 3 - 1, tap % 3 - 1
        inside = row_mask & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
        src = y_ptr + row_offsets(rows + dh * W + dw, C)  # same image: rows are (n, h, w) in row-major order
        for c0 in range(0, C, BLOCK_K):
            ks = c0 + tl.arange(0, BLOCK_K)
            k_mask = ks < C
            mask = inside[:, None] & k_mask[None, :]
            y = tl.load(src[:, None] + ks[None, :], mask=mask, other=0.0)
            if PROLOGUE:  # norm2 + relu2; zero padding is applied to the activation, after them
                mean, scale, bias = load_norm(mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, ks, k_mask, FROM_VAR)
                y = tl.where(mask, bn_relu(y, mean, scale, bias, INTERPRETED), 0.0).to(y.dtype)
            # the weight as it lies, (N, C, 3, 3): this tap of channels ks for outputs cols
            acc = dot_weight(acc, y, w_ptr, ks * 9 + tap, k_mask, cols * (C * 9), col_mask, INTERPRETED, PRECISION)

    out_mask = row_mask[:, None] & col_mask[None, :]
    new = rounded(acc, w_ptr.dtype.element_ty, INTERPRETED)  # the conv's output dtype
    if DROPOUT:  # noise = keep mask / (1 - p), in the conv's dtype
        noise = tl.load(noise_ptr + row_offsets(rows, N)[:, None] + cols[None, :], mask=out_mask, other=0.0)
        new = rounded(new.to(tl.float32) * noise.to(tl.float32), new.dtype, INTERPRETED)
    new = rounded(new.to(tl.float32), out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + row_offsets(rows, stride_out)[:, None] + cols[None, :], new, mask=out_mask)
    if STATS:  # the new segment's batch statistics, shared by every later consumer
        tile_statistics(new, row_mask, cols, col_mask, part_mean_ptr, part_m2_ptr, counter_ptr, stats_ptr,
                        stats_stride, stats_eps, M, N, BLOCK_M, BLOCK_T)  # fmt: skip


def conv_counters(m: int, k: int) -> int:
    """The arrival counters a launch with statistics of ``m`` rows and ``k`` new channels uses."""
    return counters_needed(cdiv(m, _MIN_BLOCK_M), cdiv(k, _MIN_BLOCK_N))


def conv3x3(
    y: Tensor,
    weight: Tensor,
    nhw: tuple[int, int, int],
    out: Tensor,
    *,
    prologue=None,
    noise: Tensor | None = None,
    stats: Tensor | None = None,
    stats_eps: float = 0.0,
    pool: CounterPool | None = None,
) -> Tensor:
    """Write ``conv3x3(act) * noise`` into ``out`` (``M x k``, unit column stride, e.g. a buffer slice) and
    return it.

    y: the ``M x C`` contiguous bottleneck (channels_last rows of ``nhw = (N, H, W)`` images); ``act`` is
    ``relu(norm2(y))`` with ``prologue`` (a ``fastdense.batchnorm.NormMap``), else ``y`` itself.
    weight: ``(k, C, 3, 3)``, contiguous, in the compute dtype. noise: optional ``M x k`` dropout multiplier.
    stats: a float32 ``(3, k)`` view that receives the written columns' mean, ``1 / sqrt(var + stats_eps)`` and
    biased variance. pool: the counters' pool (a dense block's).
    """
    check_kernel_tensors(y, weight, out)
    n, h, w = nhw
    m, c = y.shape
    check_rows(m, "conv3x3")
    k = weight.shape[0]
    if m != n * h * w or not y.is_contiguous():
        raise ValueError(f"conv3x3: y must be a contiguous {n * h * w} x C matrix, got {tuple(y.shape)}")
    if tuple(weight.shape) != (k, c, 3, 3) or not weight.is_contiguous():
        raise ValueError(
            f"conv3x3: weight must be a contiguous ({k}, {c}, 3, 3) to match y's {c} channels, got "
            f"{tuple(weight.shape)}"
        )
    if out.shape != (m, k) or not unit_columns(out):
        raise ValueError(f"conv3x3: out must be {m} x {k} with unit column stride, got {tuple(out.shape)}")
    if noise is not None and (noise.shape != (m, k) or not noise.is_contiguous()):
        raise ValueError(f"conv3x3: noise must be a contiguous {m} x {k} matrix, got {tuple(noise.shape)}")
    if stats is not None:
        check_statistics_out(stats, k, "conv3x3")
        if m == 0:
            empty_batch_statistics(stats, stats_eps)
    if m == 0:
        return out
    with_stats = stats is not None
    partials = empty_partials(cdiv(m, _MIN_BLOCK_M), k, y.device) if with_stats else no_partials(y.device)
    counter = take_counters(pool, conv_counters(m, k), y.device) if with_stats else partials[0]
    norm = norm_arguments(prologue) if prologue is not None else (y, y, y, y, 0.0)  # unused pointers otherwise

    def grid(meta):
        return cdiv(m, meta["BLOCK_M"]), cdiv(k, meta["BLOCK_N"])

    _conv3x3_kernel[grid](
        y, *norm, weight, out, noise if noise is not None else y, *partials, counter,
        stats if with_stats else out, stats.stride(0) if with_stats else 0, float(stats_eps),
        m, k, c, h, w, out.stride(0), row_bucket(m),
        PROLOGUE=prologue is not None, DROPOUT=noise is not None, STATS=with_stats,
        FROM_VAR=bool(prologue is not None and prologue.from_var),
        INTERPRETED=INTERPRET, PRECISION=dot_precision(weight.dtype), BLOCK_T=MERGE_ROWS,
    )  # fmt: skip
    return out


def conv3x3_reference(y, weight, nhw, *, prologue=None, noise=None):
    """``conv3x3`` with PyTorch ops, rounding where the kernel rounds (for the tests)."""
    n, h, w = nhw
    act = y
    if prologue is not None:
        mean, scale, bias = prologue.vectors()
        act = ((y.float() - mean) * scale + bias).to(y.dtype).relu()
    images = act.to(weight.dtype).float().view(n, h, w, -1).permute(0, 3, 1, 2)
    new = torch.nn.functional.conv2d(images, weight.float(), padding=1).to(weight.dtype)
    new = new.permute(0, 2, 3, 1).reshape(n * h * w, -1)
    if noise is not None:
        new = (new.float() * noise.float()).to(weight.dtype)
    return new


@_conv3x3_kernel.planned
def _conv3x3_plan(args: dict, meta: dict) -> Moved:
    """Each row tile reads, once per column tile, the bottleneck rows its nine taps reach inside the image
    (a border pixel's outside taps are masked, not read), with norm2's four vectors per tap; each column
    tile reads the whole 9C x N weight once per row tile; the new channels are written once (dropout noise
    read beside them), with the statistics' partials and their merge in training."""
    y, w, out = args["y_ptr"], args["w_ptr"], args["out_ptr"]
    m, n, c, h, width = args["M"], args["N"], args["C"], args["H"], args["W"]
    row_tiles, col_tiles = cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])
    taps_inside = m // (h * width) * (3 * h - 2) * (3 * width - 2)  # (pixel, tap) pairs inside an image
    w_bytes, vectors = 9 * c * n * w.element_size(), 4 * c * args["mean_ptr"].element_size() if args["PROLOGUE"] else 0
    read = taps_inside * c * y.element_size() * col_tiles + w_bytes * row_tiles + 9 * vectors * row_tiles * col_tiles
    noise = m * n * args["noise_ptr"].element_size() if args["DROPOUT"] else 0
    compulsory_read = m * c * y.element_size() + w_bytes + vectors + noise
    moved = Moved(read + noise, m * n * out.element_size(), 2 * m * 9 * c * n, read + noise - compulsory_read)
    return moved + partials_moved(row_tiles, n) if args["STATS"] else moved
