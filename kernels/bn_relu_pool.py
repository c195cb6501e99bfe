"""BN-ReLU followed by a pooling window, one pass over channels_last rows: the stem's
norm0-relu0-maxpool (3x3, stride 2, padding 1), a transition's norm-relu-avgpool (2x2) and the head's
norm5-relu-global average pool (one window covering the whole image).

Each program reads ``BLOCK_M`` output pixels x ``BLOCK_C`` channels and loops over the window's taps;
the normalised activation is never written. Max pooling starts from 0, which is exact after a ReLU
(every window holds at least one real pixel); padded taps are skipped. Average pooling divides by the
window size (no padding is supported for it, as in every DenseNet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .affine import bn_relu, load_norm, norm_arguments, rounded
from .launch import INTERPRET, Moved, bucket, cdiv, check_kernel_tensors, check_rows, row_bucket, tuned, unit_columns
from .offsets import row_offsets


# Elementwise over the window: 95-139 registers per thread, no shared memory, no spills (before row
# indices went int32, every configuration spilled 1.3-1.6 KB per thread when compiled unspecialised).
@tuned(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_C": 32}, num_warps=4),
    ],
    key=["C_BUCKET", "KH", "KW", "M_BUCKET", "IS_MAX"],
    interpret=triton.Config({"BLOCK_M": 16, "BLOCK_C": 16}),
)
@triton.jit
def _bn_relu_pool_kernel(
    x_ptr, mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, out_ptr,
    M, C, H, W, H_OUT, W_OUT, stride_x, stride_out, KH, KW, STRIDE, PAD, C_BUCKET, M_BUCKET,
    IS_MAX: tl.constexpr, FROM_VAR: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask, col_mask = rows < M, cols < C
    image = rows // (H_OUT * W_OUT)
    h0 = (rows // W_OUT) % H_OUT * STRIDE - PAD
    w0 = rows % W_OUT * STRIDE - PAD
    mean, scale, bias = load_norm(mean_ptr, inv_ptr, gamma_ptr, beta_ptr, eps, cols, col_mask, FROM_VAR)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for i in range(KH):
        for j in range(KW):
            h, w = h0 + i, w0 + j
            inside = row_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            mask = inside[:, None] & col_mask[None, :]
            src = row_offsets((image * H + h) * W + w, stride_x)
            x = tl.load(x_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0)
            act = tl.where(mask, bn_relu(x, mean, scale, bias, INTERPRETED), 0.0)
            if IS_MAX:
                acc = tl.maximum(acc, act, propagate_nan=tl.PropagateNan.ALL)
            else:
                acc += act
    if not IS_MAX:
        acc = acc / (KH * KW)
    out = rounded(acc, out_ptr.dtype.element_ty, INTERPRETED)
    out_rows = out_ptr + row_offsets(rows, stride_out)
    tl.store(out_rows[:, None] + cols[None, :], out, mask=row_mask[:, None] & col_mask[None, :])


@_bn_relu_pool_kernel.planned
def _bn_relu_pool_plan(args: dict, meta: dict) -> Moved:
    """Each window's taps inside the image once (padded taps are masked, not read), the BatchNorm's four
    vectors once per row tile; the output once."""
    m, c = args["M"], args["C"]
    stride, pad = args["STRIDE"], args["PAD"]

    def inside(size, out_size, kernel):  # (output position, tap) pairs inside the image along one axis
        return sum(0 <= o * stride - pad + i < size for o in range(out_size) for i in range(kernel))

    images = m // (args["H_OUT"] * args["W_OUT"])
    taps = images * inside(args["H"], args["H_OUT"], args["KH"]) * inside(args["W"], args["W_OUT"], args["KW"])
    x_bytes, vectors = args["x_ptr"].element_size() * c, 4 * c * args["mean_ptr"].element_size()
    read = taps * x_bytes + vectors * cdiv(m, meta["BLOCK_M"])
    pixels_read = images * min(args["H"], (args["H_OUT"] - 1) * stride - pad + args["KH"])
    pixels_read *= min(args["W"], (args["W_OUT"] - 1) * stride - pad + args["KW"])  # the windows' union
    return Moved(read, m * c * args["out_ptr"].element_size(), 0, read - pixels_read * x_bytes - vectors)


def pooled_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def bn_relu_pool(x: Tensor, norm, kernel: int | tuple[int, int], stride: int, padding: int, is_max: bool,
                 out: Tensor | None = None) -> Tensor:  # fmt: skip
    """``pool(relu(norm(x)))`` for an ``(N, C, H, W)`` channels_last tensor (floor-mode windows).

    norm: a ``fastdense.batchnorm.NormMap``; kernel: a square size or ``(KH, KW)``.
    out: optional ``(N * H_out * W_out) x C`` destination rows with unit column stride (e.g. the first
    channels of the next block's buffer).
    Returns an ``(N, C, H_out, W_out)`` channels_last tensor (a view of ``out`` when given).
    """
    check_kernel_tensors(x)
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("bn_relu_pool: x must be a channels_last tensor")
    if not is_max and padding != 0:
        raise ValueError(f"bn_relu_pool: average pooling takes no padding, got padding={padding}")
    n, c, h, w = x.shape
    check_rows(n * h * w, "bn_relu_pool")
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    h_out, w_out = pooled_size(h, kh, stride, padding), pooled_size(w, kw, stride, padding)
    m = n * h_out * w_out
    if out is None:
        out = torch.empty((m, c), dtype=x.dtype, device=x.device)
    if out.shape != (m, c) or not unit_columns(out):
        raise ValueError(f"bn_relu_pool: out must be {m} x {c} rows with unit column stride, got {tuple(out.shape)}")
    if m > 0 and c > 0:

        def grid(meta):
            return cdiv(m, meta["BLOCK_M"]), cdiv(c, meta["BLOCK_C"])

        _bn_relu_pool_kernel[grid](
            x, *norm_arguments(norm), out, m, c, h, w, h_out, w_out, c, out.stride(0), kh, kw, stride, padding,
            bucket(c), row_bucket(m),
            IS_MAX=is_max, FROM_VAR=bool(norm.from_var), INTERPRETED=INTERPRET,
        )  # fmt: skip
    return out.unflatten(0, (n, h_out, w_out)).permute(0, 3, 1, 2)


def bn_relu_pool_reference(x, norm, kernel, stride, padding, is_max):
    """``bn_relu_pool`` with PyTorch ops (for the tests)."""
    mean, scale, bias = (v.view(1, -1, 1, 1) for v in norm.vectors())
    act = ((x.float() - mean) * scale + bias).to(x.dtype).relu().float()
    if is_max:
        return torch.nn.functional.max_pool2d(act, kernel, stride, padding).to(x.dtype)
    return torch.nn.functional.avg_pool2d(act, kernel, stride, padding).to(x.dtype)
