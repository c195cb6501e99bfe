"""The per-channel BatchNorm map ``u = (x - mean) * weight * rstd + bias`` as the kernels apply it.

A kernel takes the map as it is stored, never precomputed vectors: the mean, ``rstd`` (or, with
``FROM_VAR``, a variance to which ``eps`` is added first: eval mode's running variance), the module's weight
and bias, in any floating dtype; ``weight * rstd`` is formed in registers. So no operator runs between the
kernels to prepare a BatchNorm's vectors. Subtracting the mean first keeps a pre-activation near zero
accurate (the torch backend folds the map, as PyTorch's CPU BatchNorm does).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


def norm_arguments(norm) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """``(mean, inv, weight, bias, eps)`` of a ``fastdense.batchnorm.NormMap`` as a kernel takes them: what the
    map holds, itself (its vectors have unit stride: parameters, buffers and rows of statistics arrays);
    ``FROM_VAR`` is ``norm.from_var``."""
    return norm.mean, norm.inv, norm.weight, norm.bias, float(norm.eps)


@triton.jit
def load_norm(mean_ptr, inv_ptr, weight_ptr, bias_ptr, eps, cols, col_mask, FROM_VAR: tl.constexpr):
    """``(mean, scale, bias)`` float32 vectors of the map for ``cols``: ``scale = weight * rstd``, with
    ``rstd = 1 / sqrt(var + eps)`` (correctly rounded) when the map holds a variance."""
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    if FROM_VAR:
        inv = tl.div_rn(1.0, tl.sqrt_rn(inv + eps))
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return mean, weight * inv, bias


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
def bn_relu(x, mean, scale, bias, INTERPRETED: tl.constexpr):
    """relu of the map on a tile (per-column vectors) as fp32, rounded to ``x``'s dtype first as
    ``nn.BatchNorm2d``'s output is before the ReLU sees it. NaN stays NaN, as in ``torch.relu``."""
    u = (x.to(tl.float32) - mean[None, :]) * scale[None, :] + bias[None, :]
    return tl.maximum(rounded(u, x.dtype, INTERPRETED).to(tl.float32), 0.0, propagate_nan=tl.PropagateNan.ALL)
