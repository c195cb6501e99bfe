"""BatchNorm -> ReLU -> pooling as one autograd node that recomputes instead of storing.

Used for the stem (norm0-relu0-pool0) and the transitions (norm-relu-avgpool, before the 1x1 conv).
Autograd would keep the BatchNorm output (the size of the input) and, for max pooling, int64
indices; this op keeps only its input and the per-channel statistics and recomputes the rest in
backward, channel chunk by channel chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batchnorm import (
    accumulation_dtype,
    affine,
    batch_stats,
    chunks,
    input_grad_from_sums,
    running_stats,
    update_running_stats,
)
from .stages import stage

POOLS = (nn.AvgPool2d, nn.MaxPool2d)


def fusable(norm: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    """Whether ``pool(relu(norm(x)))`` is the plain computation this op reproduces, with no hooks."""
    modules = (norm, relu, pool)
    return (
        type(norm) is nn.BatchNorm2d
        and norm.affine
        and norm.track_running_stats
        and type(relu) is nn.ReLU
        and type(pool) in POOLS
        and not (type(pool) is nn.AvgPool2d and pool.divisor_override is not None)
        and not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in modules)
    )


def _pool(act: Tensor, pool: nn.Module) -> Tensor:
    if isinstance(pool, nn.MaxPool2d):
        return F.max_pool2d(act, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    return F.avg_pool2d(act, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad)


def _pool_backward(grad: Tensor, act: Tensor, pool: nn.Module) -> Tensor:
    pair = nn.modules.utils._pair
    kernel, stride, padding = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size), pair(pool.padding)
    if isinstance(pool, nn.MaxPool2d):
        dilation = pair(pool.dilation)
        _, indices = F.max_pool2d(act, kernel, stride, padding, dilation, pool.ceil_mode, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad, act, kernel, stride, padding, dilation, pool.ceil_mode, indices
        )
    return torch.ops.aten.avg_pool2d_backward(
        grad, act, kernel, stride, padding, pool.ceil_mode, pool.count_include_pad, None
    )


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


class BatchNormReLUPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, norm: nn.BatchNorm2d, pool: nn.Module) -> Tensor:
        n, c, h, w = x.shape
        acc, count = accumulation_dtype(x.dtype), n * h * w
        if norm.training:
            var, mean = batch_stats(x, dim=(0, 2, 3))
            update_running_stats(norm, mean, var, count)
            rstd = torch.rsqrt(var + norm.eps)
        else:
            mean, rstd = running_stats(norm, acc)
        normalize = affine(weight, bias, mean, rstd, training=norm.training)
        out = None
        for lo, hi in chunks(c, count, min_size=1):
            piece = _pool(normalize.channels(lo, hi)(x[:, lo:hi]).relu_(), pool)
            if out is None:
                channels_last = x.is_contiguous(memory_format=torch.channels_last)
                layout = torch.channels_last if channels_last else torch.contiguous_format
                shape = (n, c, *piece.shape[2:])
                out = torch.empty(shape, dtype=piece.dtype, device=x.device, memory_format=layout)
            out[:, lo:hi] = piece
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.pool, ctx.training = pool, norm.training
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        count = n * h * w
        normalize = affine(weight, bias, mean, rstd, training=ctx.training)
        d_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        d_weight = torch.empty_like(mean)
        d_bias = torch.empty_like(mean)
        with torch.autocast(x.device.type, enabled=False), stage("bn_relu_pool_backward", x.device):
            for lo, hi in chunks(c, count, min_size=1):
                x_chunk = x[:, lo:hi]
                chunk_norm = normalize.channels(lo, hi)
                centered, pre = chunk_norm.centered_and_normalized(x_chunk)
                mask = pre > 0
                d_pre = _pool_backward(grad_out[:, lo:hi], pre.relu_(), ctx.pool).to(mean.dtype).mul_(mask)
                del pre, mask
                xhat = centered.mul_(_channel(rstd[lo:hi]))
                d_bias[lo:hi] = d_pre.sum((0, 2, 3))
                d_weight[lo:hi] = (d_pre * xhat).sum((0, 2, 3))
                if d_x is not None:
                    d_x[:, lo:hi] = input_grad_from_sums(
                        d_pre,
                        xhat,
                        _channel(d_bias[lo:hi]),
                        _channel(d_weight[lo:hi]),
                        chunk_norm.scale,
                        count,
                        ctx.training,
                    )
        return d_x, d_weight.to(weight.dtype), d_bias.to(bias.dtype), None, None


def bn_relu_pool(x: Tensor, norm: nn.BatchNorm2d, pool: nn.Module) -> Tensor:
    """``pool(relu(norm(x)))`` with ``norm``'s training/eval semantics and running-stat updates."""
    n, _, h, w = x.shape
    if norm.training and n * h * w == 1:
        raise ValueError(
            f"expected more than 1 value per channel when training (BatchNorm batch statistics), "
            f"got input size {tuple(x.shape)}"
        )
    with torch.autocast(x.device.type, enabled=False), stage("bn_relu_pool", x.device):
        return BatchNormReLUPool.apply(x, norm.weight, norm.bias, norm, pool)
