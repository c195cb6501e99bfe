"""The per-channel BatchNorm map ``u = (x - shift) * scale + bias`` as the kernels take it.

Training mode passes the batch mean as ``shift`` (subtracting it first keeps a pre-activation near zero
accurate; the torch backend folds it, as PyTorch's CPU BatchNorm does, and recomputes the 3x3 conv's
prologue this way when this kernel ran it); eval mode too, with the running mean.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def affine_vectors(norm) -> tuple[Tensor, Tensor, Tensor]:
    """``(shift, scale, bias)`` float32 contiguous vectors of a ``fastdense.batchnorm.Affine``: its mean,
    scale and bias, in eval mode too (the folded map would take two more operators, three launches a
    BatchNorm on a GPU, for the same map; subtracting the mean first is the more accurate order)."""
    return tuple(v.to(torch.float32).contiguous() for v in (norm.mean, norm.scale, norm.bias))


@triton.jit
def load_affine(shift_ptr, scale_ptr, bias_ptr, cols, col_mask):
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
    return shift, scale, bias


@triton.jit
def rounded(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """An fp32 tile rounded to ``dtype`` (to nearest even). The interpreter truncates fp32 -> bf16
    casts, so there the rounding is done on the bits first (exactly what the GPU's cast does)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def bn_relu(x, shift, scale, bias, INTERPRETED: tl.constexpr):
    """relu of the map on a tile (per-column vectors) as fp32, rounded to ``x``'s dtype first as
    ``nn.BatchNorm2d``'s output is before the ReLU sees it. NaN stays NaN, as in ``torch.relu``."""
    u = (x.to(tl.float32) - shift[None, :]) * scale[None, :] + bias[None, :]
    return tl.maximum(rounded(u, x.dtype, INTERPRETED).to(tl.float32), 0.0, propagate_nan=tl.PropagateNan.ALL)
