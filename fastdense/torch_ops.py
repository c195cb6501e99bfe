"""The ``torch`` backend: a dense block's operations (``block_algorithm.Ops``) as plain PyTorch ops.

They run on any device: they are what CPU users get, and a second oracle for the Triton kernels. The
layer loop that calls them, the saved state and the backward's order are ``block_algorithm``'s, shared
with the triton backend (``triton_ops``), which fuses the same operations into kernels.

Precision: GEMMs and convolutions run in the compute dtype (the autocast dtype under autocast, else the
input's dtype); statistics, normalisation and gradient sums run in the accumulation dtype (float64 for
float64 inputs, float32 otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .batchnorm import Affine, batch_stats, chunks, input_grad_from_sums
from .block_algorithm import Ops
from .layout import as_images, as_rows
from .stages import stage

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv3x3(images: Tensor, weight: Tensor) -> Tensor:
    """The layer's 3x3 (3x3x3, ...) convolution with padding 1, for 1 to 3 spatial dimensions."""
    return _CONV_FUNCTIONS[images.dim() - 2](images, weight, padding=1)


def column_stats(cols: Tensor) -> tuple[Tensor, Tensor]:
    """``Ops.column_stats``: biased variance and mean of each column."""
    return batch_stats(cols, dim=0)


def bottleneck(x: Tensor, norm1: Affine, w1: Tensor, stats: bool, epilogue: Affine | None = None):
    """``Ops.bottleneck``: ``relu(norm1(x)) @ W1^T`` for an ``M x C_l`` prefix of the buffer, the GEMM
    prologue of DESIGN.md in row chunks, so the normalised activations never exist for all rows at once.
    No eval-mode epilogue here (``fuses_eval_norm2`` is False)."""
    w1_t = w1.t()
    out = torch.empty((x.shape[0], w1_t.shape[1]), dtype=w1_t.dtype, device=x.device)
    for lo, hi in chunks(x.shape[0], x.shape[1]):
        act = norm1(x[lo:hi]).relu_().to(w1_t.dtype)
        torch.mm(act, w1_t, out=out[lo:hi])
    return out, batch_stats(out, dim=0) if stats else None


def conv3x3_into(bottleneck, norm2: Affine | None, w2, grid, out, noise, stats: bool, column_stats=column_stats):
    """``Ops.new_features`` with a 3x3 convolution from PyTorch (cuDNN on CUDA): the activation is
    materialised, convolved, multiplied by the dropout noise and copied into the buffer slice.
    ``grid``: ``(N, *spatial)``, the shape the buffer's rows come from."""
    act2 = bottleneck if norm2 is None else norm2(bottleneck).relu_()
    new = _conv3x3(as_images(act2.to(w2.dtype), *grid), w2)  # (N, k, *spatial)
    del act2
    if noise is not None:
        new = new * as_images(noise, *grid)
    as_images(out, *grid).copy_(new)
    del new
    return column_stats(out) if stats else None


def conv3x3_norm2_backward(
    d_new, bottleneck, norm2: Affine, rstd2, w2c, grid, training: bool, need_weight: bool, sync, count: int
):
    """``Ops.new_features_backward``: from the gradient of a layer's new features (dropout already undone)
    back to its bottleneck: 3x3 conv, ReLU and norm2 backward, with norm2-ReLU recomputed exactly as the
    forward did. ``sync`` (SyncBatchNorm): the input gradient takes the sums over all ``count`` rows of
    every process.

    Returns the bottleneck gradient (compute dtype) and the gradients of norm2's weight and bias and of
    conv2's weight (None when not needed)."""
    ones, zeros = [1] * (len(grid) - 1), [0] * (len(grid) - 1)
    acc, cdt = rstd2.dtype, w2c.dtype
    pre2 = norm2(bottleneck)
    mask2 = pre2 > 0
    act2 = pre2.relu_().to(cdt)
    del pre2
    with stage("conv_backward", bottleneck.device):
        images = (as_images(d_new.to(cdt), *grid), as_images(act2, *grid))
        if len(grid) == 4 and act2.device.type == "cpu" and cdt in (torch.bfloat16, torch.float16):
            # PyTorch's CPU 3-D weight gradient from channels_last_3d bf16 tensors is wrong on 2x2x2 maps
            # (relative error ~1, seen with torch 2.14); from contiguous ones it is right.
            images = tuple(t.contiguous() for t in images)
        d_act2, d_w2, _ = torch.ops.aten.convolution_backward(
            *images, w2c, None, ones, ones, ones, False, zeros, 1, [True, need_weight, False]
        )
    del act2, images
    with stage("norm_backward", bottleneck.device):
        d_pre2 = as_rows(d_act2).to(acc).mul_(mask2)  # through relu2
        del d_act2, mask2
        yhat = (bottleneck.to(acc) - norm2.mean).mul_(rstd2)
        d_b2 = d_pre2.sum(0)
        d_g2 = (d_pre2 * yhat).sum(0)
        sums = (d_b2, d_g2) if sync is None else sync.sum(d_b2, d_g2)  # the parameters' gradients stay local
        d_bottleneck = input_grad_from_sums(d_pre2, yhat, *sums, norm2.scale, count, training).to(cdt)
    return d_bottleneck, d_g2, d_b2, d_w2


def norm1_backward(d_bottleneck, x, norm1: Affine, rstd1, w1c, grad_sum, coef, need_weight: bool):
    """``Ops.norm1_backward``: norm1 backward over an ``M x C_l`` buffer prefix, in row chunks. With
    ``u = norm1(x)`` recomputed, ``P = (dY @ W1) * [u > 0]`` is norm1's output gradient and
    ``dW1 = dY^T @ relu(u)``; ``P * coef`` (gamma in training, the eval map's slope otherwise) is added to
    G's first ``C_l`` columns.

    Returns norm1's weight and bias gradients and conv1's weight gradient (None when not needed)."""
    m, c_in = x.shape
    acc, cdt = rstd1.dtype, w1c.dtype
    d_w1 = torch.zeros((w1c.shape[0], c_in), dtype=acc, device=x.device) if need_weight else None
    d_b1 = torch.zeros(c_in, dtype=acc, device=x.device)
    d_g1 = torch.zeros(c_in, dtype=acc, device=x.device)  # sum(P * (x - mean)); times rstd at the end
    for lo, hi in chunks(m, c_in):
        x_chunk, d_y = x[lo:hi], d_bottleneck[lo:hi]
        centered, pre1 = norm1.centered_and_normalized(x_chunk)
        mask1 = pre1 > 0
        if d_w1 is not None:
            d_w1 += (d_y.t() @ pre1.relu_().to(cdt)).to(acc)
        del pre1
        p_grad = (d_y @ w1c).to(acc).mul_(mask1)
        del mask1
        d_b1 += p_grad.sum(0)
        d_g1 += centered.mul_(p_grad).sum(0)
        del centered
        grad_sum[lo:hi, :c_in].addcmul_(p_grad, coef)
        del p_grad
    return d_g1.mul_(rstd1), d_b1, d_w1


def finalize(g: Tensor, x: Tensor, d_out: Tensor, stats, noise: Tensor | None) -> Tensor:
    """``Ops.finalize``: a segment's input gradient from its column range of G (accumulation dtype), of the
    buffer and of the output gradient. ``stats``: ``(mean, rstd, sum_g, sum_gx)`` per channel in training,
    None in eval (frozen statistics: each norm1 is an affine map, already in G). ``noise``: the layer's
    dropout multiplier, applied last (dropout backward)."""
    d_out = d_out.to(g.dtype)
    if stats is None:
        d_x = g + d_out
    else:
        mean, rstd, sum_g, sum_gx = stats
        m = g.shape[0]
        d_x = (x.to(g.dtype) - mean).mul_(rstd)  # xhat
        d_x.mul_(sum_gx / m).neg_().add_(g).sub_(sum_g / m).mul_(rstd).add_(d_out)
    return d_x.mul_(noise) if noise is not None else d_x


TORCH_OPS = Ops(
    column_stats=column_stats,
    bottleneck=bottleneck,
    new_features=conv3x3_into,
    new_features_backward=conv3x3_norm2_backward,
    norm1_backward=norm1_backward,
    finalize=finalize,
)
