"""The ``triton`` backend: a dense block's operations (``block_algorithm.Ops``) as the kernels of
``kernels/`` (docs/design.md sections 3 and 4).

The layer loops, running-statistics updates and the saved state are ``block_algorithm``'s, shared with
the torch backend (``torch_ops``); only the operations inside differ. Forward: the block input's
statistics by a reduction kernel, BN-ReLU-1x1 conv as one GEMM with norm2's statistics (training) or
norm2-ReLU (eval) in its epilogue, and the 3x3 conv as an implicit GEMM with the norm2-ReLU prologue that
writes straight into the buffer slice and the new segment's statistics: two launches a layer, nothing
between them (the kernels read the BatchNorm maps and the weights as they are stored, and merge their
statistics themselves). Backward, four launches a layer: the segment finalize; the 3x3 conv's data
gradient through relu2 with norm2's gradients and the vectors of its input gradient, and its weight gradient
(``kernels.conv3x3_backward``: norm2-ReLU recomputed in their prologue and epilogue); dgrad into the gradient
buffer with norm1's gradients and the block's sums, and split-M wgrad, both forming the bottleneck's gradient
as they load it. 1-D and 3-D blocks (and SyncBatchNorm's) run the 3x3 conv's backward on PyTorch's kernels
(cuDNN), after norm2's activation is recomputed by a kernel.

``kernels`` (and so ``triton``) is imported on first use: ``TRITON_INTERPRET=1`` must be set before
Triton is imported, and CPU-only installs need not have Triton at all.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import NamedTuple

import torch

from .block_algorithm import Ops
from .torch_ops import conv3x3_into, conv3x3_norm2_backward

# How the triton backend runs the 3x3 conv: "triton" (implicit GEMM with the norm2-ReLU prologue,
# writing into the buffer) or "cudnn" (PyTorch's conv2d on the materialised activation, then a copy).
CONV3X3_ENV_VAR = "FASTDENSE_CONV3X3"
CONV3X3_CHOICES = ("triton", "cudnn")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def conv3x3_choice() -> str:
    choice = os.environ.get(CONV3X3_ENV_VAR, "triton").strip().lower() or "triton"
    if choice not in CONV3X3_CHOICES:
        raise ValueError(f"environment variable {CONV3X3_ENV_VAR} must be 'triton' or 'cudnn', got {choice!r}")
    return choice


def check_dtypes(x: torch.Tensor, compute_dtype: torch.dtype) -> None:
    for what, dtype in (("input", x.dtype), ("compute", compute_dtype)):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"backend='triton' supports float32, float16 and bfloat16; got {what} dtype {dtype} "
                "(use backend='torch' for it)"
            )


@functools.cache
def _kernels() -> SimpleNamespace:
    from fastdense.kernels import (
        bn_relu_gemm,
        bn_relu_gemm_backward,
        bn_relu_pool,
        conv3x3,
        conv3x3_backward,
        finalize,
        last_program,
        launch,
        stats,
    )  # fmt: skip

    return SimpleNamespace(
        gemm=bn_relu_gemm, backward=bn_relu_gemm_backward, conv=conv3x3, conv_backward=conv3x3_backward,
        finalize=finalize, stats=stats, pool=bn_relu_pool, last=last_program, launch=launch,
    )  # fmt: skip


def _column_stats(cols, stats, eps, pool=None):
    _kernels().stats.column_stats(cols, eps, out=stats, pool=pool)


def _bottleneck(x, norm1, w1, stats, stats_eps, epilogue, pool=None):
    return _kernels().gemm.bn_relu_gemm(x, norm1, w1, epilogue=epilogue, stats=stats, stats_eps=stats_eps, pool=pool)


def _new_features_triton(bottleneck, norm2, w2, grid, out, noise, stats, stats_eps, pool=None):
    _kernels().conv.conv3x3(bottleneck, w2, grid, out, prologue=norm2, noise=noise, stats=stats, stats_eps=stats_eps,
                            pool=pool)  # fmt: skip


def _new_features_cudnn(bottleneck, norm2, w2, grid, out, noise, stats, stats_eps, pool=None):
    conv3x3_into(bottleneck, norm2, w2, grid, out, noise, stats, stats_eps, pool, column_stats=_column_stats,
                 activation=_norm2_activation)  # fmt: skip


class Norm2Grad(NamedTuple):
    """What the fused 3x3 conv backward hands the 1x1 conv's: norm2's output gradient ``d_pre`` (``M x 4k``),
    the bottleneck and the ``(4, 4k)`` vectors that form the bottleneck's gradient from them
    (``kernels.conv3x3_backward``); the 1x1 backward kernels form it as they load it, so it is never stored."""

    d_pre: torch.Tensor
    bottleneck: torch.Tensor
    vectors: torch.Tensor


def _new_features_backward(d_new, bottleneck, norm2, w2, grid, training, need_weight, sync, count, pool=None):
    """The 3x3 conv's backward with norm2's and relu2's by two kernels (``kernels.conv3x3_backward``): the
    activation is recomputed in their prologue and epilogue, never stored, and the bottleneck's gradient is
    left for the 1x1 backward to form (``Norm2Grad``). 2-D blocks of a non-empty batch with this process's
    statistics; otherwise PyTorch's conv backward (cuDNN) after recomputing norm2-ReLU by a kernel."""
    if len(grid) != 3 or sync is not None or bottleneck.shape[0] == 0 or conv3x3_choice() != "triton":
        return conv3x3_norm2_backward(d_new, bottleneck, norm2, w2, grid, training, need_weight, sync, count,
                                      activation=_norm2_activation)  # fmt: skip
    d_gamma, d_beta = (torch.empty_like(v) for v in (norm2.weight, norm2.bias))
    d_w2 = torch.empty(w2.shape, dtype=norm2.weight.dtype, device=w2.device) if need_weight else None
    d_pre, vectors = _kernels().conv_backward.conv3x3_norm2_backward(
        d_new.contiguous(), bottleneck.contiguous(), norm2, w2, grid, d_gamma=d_gamma, d_beta=d_beta,
        d_weight=d_w2, pool=pool,
    )  # fmt: skip
    return Norm2Grad(d_pre, bottleneck.contiguous(), vectors), d_gamma, d_beta, d_w2


def _norm1_backward(d_bottleneck, x, norm1, w1c, grad_sum, sums, need_weight, from_w1_grad=False, first=False,
                    pool=None, divisor=None, *, columns=None, upper=None):  # fmt: skip
    """dgrad into G with norm1's gradients and the block's sums, and wgrad, by the kernels (mask recomputed as
    the forward's; the sums come from the kernel's own pass, so ``from_w1_grad`` is never asked for; with
    ``first`` the dgrad writes G's prefix instead of adding to it: G needs no zero-fill). The gradients are
    written in the parameters' dtypes. ``d_bottleneck``: the bottleneck's gradient, or a ``Norm2Grad``.

    Layers in pairs (``Ops.pairs_layers``): ``columns=(lo, hi)``, the upper layer's dgrad over the buffer
    columns ``[lo, hi)`` only and its whole wgrad, returning the ``UpperLayer`` that the lower layer's call
    takes as ``upper`` (its dgrad then adds both layers' contributions over ``[0, lo)``)."""
    kernels = _kernels().backward
    d_gamma, d_beta = (torch.empty_like(v) for v in (norm1.weight, norm1.bias))
    d_w1 = torch.empty(w1c.shape, dtype=norm1.weight.dtype, device=w1c.device) if need_weight else None
    norm2_grad = None
    if isinstance(d_bottleneck, Norm2Grad):
        d_bottleneck, norm2_grad = d_bottleneck.d_pre, (d_bottleneck.bottleneck, d_bottleneck.vectors)
    d_bottleneck = d_bottleneck.contiguous()
    if columns is None:
        kernels.norm1_gemm_backward(
            d_bottleneck, x, norm1, w1c, grad_sum, d_gamma=d_gamma, d_beta=d_beta, d_weight=d_w1, sums=sums,
            first=first, pool=pool, norm2_grad=norm2_grad,
            upper=None if upper is None else kernels.UpperLayer(*upper[:3], *(v[: x.shape[1]] for v in upper[3:])),
        )  # fmt: skip
        return d_gamma, d_beta, d_w1
    lo, hi = columns
    d_y = torch.empty_like(d_bottleneck) if norm2_grad is not None else d_bottleneck  # formed by the dgrad
    kernels.norm1_gemm_backward(
        d_bottleneck, x[:, lo:hi], norm1.channels(lo, hi), w1c[:, lo:hi], grad_sum[:, lo:hi], d_gamma=d_gamma[lo:hi],
        d_beta=d_beta[lo:hi], sums=None if sums is None else sums[:, lo:hi], first=first, pool=pool,
        norm2_grad=norm2_grad, d_y_out=d_y if norm2_grad is not None else None,
    )  # fmt: skip
    if d_w1 is not None:
        kernels.norm1_weight_grad(d_y, x, norm1, d_w1, pool=pool)
    return d_gamma, d_beta, d_w1, (d_y, w1c, norm1, d_gamma, d_beta)


def _pairs_layers(compute_dtype: torch.dtype) -> bool:
    """Layers are paired in the 1x1 backward but for float32 products with TF32 off: there the paired dgrad's
    FMA products spilled registers on Hopper in every tile tried (``kernels.bn_relu_gemm_backward``)."""
    return _kernels().launch.dot_precision(compute_dtype) != "ieee"


def _norm2_activation(bottleneck, norm2):
    """``relu(norm2(Y))`` of the ``M x 4k`` bottleneck, recomputed for the 3x3 conv's backward by the
    BN-ReLU kernel with a 1x1 window (the rows as one image one pixel high): one pass, and the prologue's
    own map and rounding, so the ReLU masks are those the forward's conv saw."""
    rows, channels = bottleneck.shape
    image = bottleneck.contiguous().view(1, 1, rows, channels).permute(0, 3, 1, 2)  # channels_last (1, C, 1, M)
    act = torch.empty_like(bottleneck, memory_format=torch.contiguous_format)
    _kernels().pool.bn_relu_pool(image, norm2, 1, 1, 0, False, out=act)
    return act


def _finalize(g, x, d_out, stats, noise, dtype):
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    return _kernels().finalize.finalize(g, x, d_out, out, stats, noise)


def _counters(phase, m, c0, k, width, layers, need_weights, device):
    """One zeroed array of arrival counters for every launch of a block's forward or backward that merges
    partial results (``kernels.last_program``): one zero-fill per block instead of a merge launch per kernel."""
    kernels = _kernels()
    c_total = c0 + layers * k
    if phase == "forward":
        count = kernels.stats.column_stats_counters(m, c0) + layers * (
            kernels.gemm.gemm_counters(m, width) + kernels.conv.conv_counters(m, k)
        )
    else:
        per_layer = [kernels.backward.norm1_backward_counters(m, c0 + layer * k, width, need_weights)
                     for layer in range(layers)]  # fmt: skip
        count = sum(per_layer) + layers * kernels.conv_backward.backward_counters(m, width, k, need_weights)
        count = count if c_total else 0
    return kernels.last.CounterPool(count, device)


def triton_ops(spatial_dims: int = 2) -> Ops:
    """The Triton backend's kernels, with the 3x3 conv chosen by ``FASTDENSE_CONV3X3``. The implicit-GEMM
    conv kernel is 2-D; 1-D and 3-D blocks (3x3x3 conv) run the conv on PyTorch's (cuDNN's) kernels."""
    use_kernel = spatial_dims == 2 and conv3x3_choice() == "triton"
    return Ops(
        column_stats=_column_stats,
        bottleneck=_bottleneck,
        new_features=_new_features_triton if use_kernel else _new_features_cudnn,
        new_features_backward=_new_features_backward
        if use_kernel
        else functools.partial(conv3x3_norm2_backward, activation=_norm2_activation),
        norm1_backward=_norm1_backward,
        finalize=_finalize,
        counters=_counters,
        fuses_eval_norm2=True,
        norm1_writes_first=True,
        pairs_layers=_pairs_layers,
    )
