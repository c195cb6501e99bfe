"""Segment finalize (docs/design.md section 4): the input gradient of one column range of the block buffer
once every consumer's BatchNorm gradient has been summed into ``G``.

Training (batch statistics shared by every consumer):
    ``dx = rstd * (g - sum_g / M - xhat * sum_gx / M) + dOut``, ``xhat = (x - mean) * rstd``,
with ``sum_g`` and ``sum_gx`` the per-channel sums already accumulated from each consumer's dbeta and
dgamma (no extra pass over G). Eval (frozen statistics): ``dx = g + dOut``. Optionally multiplied by a
dropout noise matrix (the layer's dropout backward) on the way out. One elementwise pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import Moved, bucket, cdiv, check_kernel_tensors, check_rows, tuned, unit_columns
from .offsets import row_offsets


# Elementwise: 32-116 registers per thread, at most 8 KB of shared memory, no spills.
@tuned(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_C": 64}, num_warps=8),
    ],
    key=["C_BUCKET", "TRAINING", "DROPOUT"],
    interpret=triton.Config({"BLOCK_M": 32, "BLOCK_C": 16}),
)
@triton.jit
def _finalize_kernel(
    g_ptr, x_ptr, dout_ptr, noise_ptr, out_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gx_ptr,
    M, C, stride_g, stride_x, stride_dout, stride_out, inv_m, C_BUCKET,
    TRAINING: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    dx = tl.load(g_ptr + row_offsets(rows, stride_g)[:, None] + cols[None, :], mask=mask, other=0.0)
    if TRAINING:
        x = tl.load(x_ptr + row_offsets(rows, stride_x)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
        rstd = tl.load(rstd_ptr + cols, mask=col_mask, other=0.0)
        mean_g = tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0) * inv_m
        mean_gx = tl.load(sum_gx_ptr + cols, mask=col_mask, other=0.0) * inv_m
        xhat = (x - mean[None, :]) * rstd[None, :]
        dx = rstd[None, :] * (dx - mean_g[None, :] - xhat * mean_gx[None, :])
    d_out = tl.load(dout_ptr + row_offsets(rows, stride_dout)[:, None] + cols[None, :], mask=mask, other=0.0)
    dx += d_out.to(tl.float32)
    if DROPOUT:
        dx *= tl.load(noise_ptr + row_offsets(rows, C)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row_offsets(rows, stride_out)[:, None] + cols[None, :], dx, mask=mask)


def finalize(
    grad_sum: Tensor,
    x: Tensor,
    d_out: Tensor,
    out: Tensor,
    stats: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    noise: Tensor | None = None,
) -> Tensor:
    """Write the finalised gradient of an ``M x c`` column range into ``out`` (``M x c``, unit column
    stride; its dtype decides the rounding) and return it.

    grad_sum, x, d_out: that range of G (float32), of the buffer and of the output gradient, each with
    unit column stride. stats: ``(mean, rstd, sum_g, sum_gx)`` per channel in training; None in eval.
    noise: an optional contiguous ``M x c`` dropout multiplier.
    """
    check_kernel_tensors(grad_sum, x, d_out, out)
    m, c = x.shape
    check_rows(m, "finalize")
    for name, t in (("grad_sum", grad_sum), ("d_out", d_out), ("out", out)):
        if t.shape != (m, c) or not unit_columns(t):
            raise ValueError(f"finalize: {name} must be {m} x {c} with unit column stride, got {tuple(t.shape)}")
    vectors = [v.to(torch.float32).contiguous() for v in stats] if stats is not None else [grad_sum] * 4
    if m > 0 and c > 0:

        def grid(meta):
            return cdiv(m, meta["BLOCK_M"]), cdiv(c, meta["BLOCK_C"])

        _finalize_kernel[grid](
            grad_sum, x, d_out, noise if noise is not None else grad_sum, out, *vectors,
            m, c, grad_sum.stride(0), x.stride(0), d_out.stride(0), out.stride(0), 1.0 / m, bucket(c),
            TRAINING=stats is not None, DROPOUT=noise is not None,
        )  # fmt: skip
    return out


@_finalize_kernel.planned
def _finalize_plan(args: dict, meta: dict) -> Moved:
    """G's range, the output gradient (and the noise) once, the buffer and four vectors per row tile in
    training; the input gradient written once."""
    m, c, training = args["M"], args["C"], args["TRAINING"]
    read = m * c * (4 + args["dout_ptr"].element_size())
    vectors = 4 * 4 * c if training else 0
    read += m * c * args["x_ptr"].element_size() + vectors * cdiv(m, meta["BLOCK_M"]) if training else 0
    read += m * c * args["noise_ptr"].element_size() if args["DROPOUT"] else 0
    reread = vectors * (cdiv(m, meta["BLOCK_M"]) - 1)
    return Moved(read, m * c * args["out_ptr"].element_size(), 0, reread)


def finalize_reference(grad_sum, x, d_out, stats, noise=None):
    """``finalize`` with PyTorch ops, in float32 (for the tests)."""
    dx = grad_sum.clone()
    if stats is not None:
        mean, rstd, sum_g, sum_gx = stats
        m = x.shape[0]
        xhat = (x.float() - mean) * rstd
        dx = rstd * (dx - sum_g / m - xhat * sum_gx / m)
    dx = dx + d_out.float()
    return dx * noise.float() if noise is not None else dx
