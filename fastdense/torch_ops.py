"""The ``torch`` backend: a dense block's operations (``block_algorithm.Ops``) as plain PyTorch ops.

They run on any device: they are what CPU users get, and a second oracle for the Triton kernels. The
layer loop that calls them, the saved state and the backward's order are ``block_algorithm``'s, shared
with the triton backend (``triton_ops``), which fuses the same operations into kernels.

Lean by construction: every operation is a few whole-matrix ATen operators, each one pass over memory
(``python -m fastdense traffic`` counts them). A layer's norm1-ReLU is two passes in the compute dtype
(a folded affine map computed in the accumulation dtype and rounded once, then an in-place ReLU); in
training norm2's statistics and map are one PyTorch BatchNorm call over the contiguous bottleneck. In
the backward, norm1's ``sum(P)`` is a reduction over the whole prefix and ``sum(P * xhat)`` comes from
conv1's weight gradient, with no pass at all, where the layer's parameters keep that exact (else a
product and a reduction); the ReLU masks are PyTorch's own ``threshold_backward``; norm2's backward is
PyTorch's BatchNorm backward; the gradient buffer G is in the buffer's dtype (as autograd accumulates
torchvision's gradients), written, not zeroed then added to, by the first layer to reach it.

Precision: GEMMs and convolutions run in the compute dtype (the autocast dtype under autocast, else the
input's dtype); statistics and per-channel sums in the accumulation dtype (float64 for float64 inputs,
float32 otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .batchnorm import (
    MEAN,
    RSTD,
    Affine,
    NormMap,
    as_dtype,
    batch_norm_backward_in_place,
    batch_stats,
    fold_many,
    folded_input_grad,
    input_grad_from_sums,
    native_training_norm,
)
from .block_algorithm import Ops
from .devices import device_type
from .layout import as_images, as_rows
from .stages import stage

# Names, looked up in torch.nn.functional when called: a tool that patches F.conv2d (ptflops) sees the call.
_CONV_FUNCTIONS = {1: "conv1d", 2: "conv2d", 3: "conv3d"}
_aten = torch.ops.aten

# The largest temporary (elements) a layer's norm1 step (and the CPU's in-place BatchNorm backward) builds
# at once, per device type: on a GPU small launches are the cost, so a chunk is large (a whole prefix at
# ImageNet sizes); on the CPU (3-D volumes, where memory is what stops people) it stays at 32 MiB of float32.
CHUNK_ELEMENTS = {"cpu": 1 << 23}
DEFAULT_CHUNK_ELEMENTS = 1 << 26

# How far a norm1 bias may exceed its weight's magnitude for the layer's ``sum(P * xhat)`` to come from
# conv1's weight gradient (``norm1_weight_grad_serves``), per compute dtype: the amplified rounding of the
# recomputed activation stays within twice torchvision's own error in half precision, and far below the
# tolerances in float32 and float64.
WEIGHT_GRAD_BIAS_BOUND = {torch.bfloat16: 1.0, torch.float16: 1.0, torch.float32: 4.0, torch.float64: 1024.0}


def row_chunks(x: Tensor):
    """Row ranges of an ``M x C`` matrix whose ``range x C`` temporaries stay within the device's chunk
    (at least one range: an empty batch's)."""
    m, width = x.shape
    step = max(1, CHUNK_ELEMENTS.get(device_type(x), DEFAULT_CHUNK_ELEMENTS) // max(width, 1))
    for lo in range(0, max(m, 1), step):
        yield lo, min(lo + step, m)


def batch_norm_backward_in_place_serves(t: Tensor) -> bool:
    """Whether a BatchNorm backward on ``t`` runs ``batchnorm.batch_norm_backward_in_place``: float32 or
    float64 on the CPU, where memory bounds 3-D volumes and an input-sized temporary counts; on a GPU
    PyTorch's kernel (one pass; its output is a third input-sized tensor)."""
    return device_type(t) == "cpu" and t.dtype in (torch.float32, torch.float64)


def _conv3x3(images: Tensor, weight: Tensor) -> Tensor:
    """The layer's 3x3 (3x3x3, ...) convolution with padding 1, for 1 to 3 spatial dimensions."""
    return getattr(F, _CONV_FUNCTIONS[images.dim() - 2])(images, weight, padding=1)


def _folded(norm) -> Affine:
    """A BatchNorm map as the torch backend applies it: folded (``Affine``), as ``Ops.fold_maps`` prepared
    it for the whole block, or now (two operators on C-vectors)."""
    return norm if isinstance(norm, Affine) else norm.folded()


def column_stats(cols: Tensor, stats: Tensor, eps: float, pool=None) -> None:
    """``Ops.column_stats``: the mean and ``1 / sqrt(var + eps)`` of an ``M x c`` buffer slice written into
    rows ``MEAN`` and ``RSTD`` of the ``(3, c)`` view ``stats`` (``Ops.variance_from_rstd``: the algorithm
    forms the variances of the whole block at its end). On the CPU (and in float64) from the corrected two-pass
    ``batch_stats``; on a GPU from one PyTorch BatchNorm call with ``eps``, whose statistics are the two
    rows (and whose normalised output, the columns' size, is discarded)."""
    if device_type(cols) == "cpu" or cols.numel() == 0 or cols.dtype == torch.float64:
        var, mean = batch_stats(cols, dim=0)
        stats[MEAN].copy_(mean)
        torch.add(var, eps, out=stats[RSTD]).rsqrt_()
        return
    # (any float32 vector as the weight: it scales only the discarded output, and keeps the statistics float32)
    _, mean, rstd = torch.native_batch_norm(cols, stats[MEAN], None, None, None, True, 0.0, eps)
    stats[MEAN].copy_(mean)
    stats[RSTD].copy_(rstd)


def column_var_mean(cols: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean of each column of an ``M x c`` matrix, in the accumulation dtype.

    On the CPU (and in float64) the corrected two-pass ``batch_stats``, several times faster there than
    ``torch.var_mean``. On a GPU one reduction: Welford's ``var_mean`` for float32 columns. bfloat16 and
    float16 ones would get statistics rounded to their own dtype from ``var_mean``, and a float32 copy
    first would cost more than the reduction; they get BatchNorm's own (``native_batch_norm`` with eps 0:
    Welford in float32 over the columns as they are, as PyTorch's BatchNorm computes them), whose
    normalised output, a write of the columns' size, is discarded."""
    if device_type(cols) == "cpu" or cols.numel() == 0 or cols.dtype == torch.float64:
        return batch_stats(cols, dim=0)
    if cols.dtype == torch.float32:
        var, mean = torch.var_mean(cols, dim=0, correction=0)
        return var, mean
    ones = torch.ones(cols.shape[1], dtype=torch.float32, device=cols.device)  # float32 statistics everywhere
    _, mean, rstd = torch.native_batch_norm(cols, ones, None, None, None, True, 0.0, 0.0)
    return torch.where(rstd > 0, rstd.pow(-2), 0.0), mean  # eps 0: rstd = var^-1/2 (0 or inf where var is 0)


def normalized_relu(x: Tensor, norm: Affine, dtype: torch.dtype) -> Tensor:
    """``relu(norm(x))`` as a new tensor in ``dtype`` and ``x``'s layout (contiguous for a strided buffer
    prefix): the folded map ``x * scale + shift`` computed in the accumulation dtype and rounded once
    (PyTorch's CPU BatchNorm computes the same), then an in-place ReLU. The backward recomputes it with
    this same function, so its ReLU masks are the forward's. ``norm``'s vectors are shaped to broadcast
    over ``x``."""
    out = torch.empty_like(x, dtype=dtype)
    torch.addcmul(norm.shift, x, norm.scale, out=out)
    return out.relu_()


def bottleneck(x: Tensor, norm1: NormMap, w1: Tensor, stats: Tensor | None, stats_eps: float, epilogue=None,
               pool=None) -> Tensor:  # fmt: skip
    """``Ops.bottleneck``: ``relu(norm1(x)) @ W1^T`` for an ``M x C_l`` prefix of the buffer (docs/design.md's
    GEMM prologue, here as its own two passes, in ``row_chunks``), with its column statistics written into
    ``stats`` when given. No eval-mode epilogue (``fuses_eval_norm2`` is False)."""
    out = torch.empty((x.shape[0], w1.shape[0]), dtype=w1.dtype, device=x.device)
    folded = _folded(norm1)
    for lo, hi in row_chunks(x):
        torch.mm(normalized_relu(x[lo:hi], folded, w1.dtype), w1.t(), out=out[lo:hi])
    if stats is not None:
        column_stats(out, stats, stats_eps)
    return out


def norm2_relu_training(bottleneck: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """``Ops.norm2_relu_training``: norm2's batch statistics and ``relu(norm2(Y))`` of the contiguous
    bottleneck from PyTorch's BatchNorm in training mode (statistics, then the map: two passes over ``Y``
    and one write) and an in-place ReLU, instead of the statistics and then ``normalized_relu``. Its vectors
    are float32 (float64 for float64 data), so are the statistics. The backward recomputes the activation
    with ``normalized_relu`` from the returned mean and rstd: PyTorch's CPU BatchNorm applies that folded
    map itself (the same bits: tested). A GPU's kernel computes ``(Y - mean) * rstd * weight + bias`` in
    float32: where that and the folded map round to different sides of a bfloat16/float16 value, or of zero
    (the ReLU mask), the recomputed activation differs from the forward's by one unit in its last place.
    Returns the activation, the mean and the rstd (the block's variances come from the rstds:
    ``Ops.variance_from_rstd``)."""
    act, mean, rstd = native_training_norm(bottleneck, weight, bias, eps)
    return act.relu_(), mean, rstd


def conv3x3_into(bottleneck, norm2: NormMap | None, w2, grid, out, noise, stats: Tensor | None, stats_eps: float,
                 pool=None, column_stats=column_stats, activation=None):  # fmt: skip
    """``Ops.new_features`` with a 3x3 convolution from PyTorch (cuDNN on CUDA): the activation is
    materialised (``activation(Y, norm2)``, default the folded map of ``normalized_relu``), convolved,
    multiplied by the dropout noise and copied into the buffer slice; the statistics are taken from the
    convolution's own (contiguous) output before the copy. ``grid``: ``(N, *spatial)``, the shape the
    buffer's rows come from."""
    if norm2 is None:
        act2 = bottleneck
    elif activation is None:
        act2 = normalized_relu(bottleneck, _folded(norm2), w2.dtype)
    else:
        act2 = activation(bottleneck, norm2)
    new = _conv3x3(as_images(act2.to(w2.dtype), *grid), w2)  # (N, k, *spatial)
    del act2
    if noise is not None:
        new.mul_(as_images(noise, *grid))
    same_dtype = new.dtype == out.dtype
    if stats is not None and same_dtype:
        column_stats(as_rows(new), stats, stats_eps, pool)
    as_images(out, *grid).copy_(new)
    if stats is not None and not same_dtype:  # the statistics of what the buffer holds, rounded to its dtype
        column_stats(out, stats, stats_eps, pool)


def conv3x3_norm2_backward(
    d_new,
    bottleneck,
    norm2: NormMap | Affine,
    w2c,
    grid,
    training: bool,
    need_weight: bool,
    sync,
    count: int,
    pool=None,
    *,
    activation: Callable[[Tensor, NormMap], Tensor] | None = None,
):
    """``Ops.new_features_backward``: from the gradient of a layer's new features (dropout already undone)
    back to its bottleneck: 3x3 conv, ReLU and norm2 backward, with norm2-ReLU recomputed exactly as the
    forward did: the folded map of ``normalized_relu``, or ``activation(Y, norm2)`` (the triton backend's:
    its 3x3 conv's prologue map, by a kernel), so the ReLU masks are the forward's.
    ``sync`` (SyncBatchNorm): the input gradient takes the sums over all ``count`` rows of every process.
    ``pool``: the block's arrival counters (unused here).

    Returns the bottleneck gradient (compute dtype) and the gradients of norm2's weight and bias and of
    conv2's weight (None when not needed)."""
    ones, zeros = [1] * (len(grid) - 1), [0] * (len(grid) - 1)
    cdt = w2c.dtype
    rstd2 = norm2.rstd if isinstance(norm2, Affine) else norm2.rstd()
    mean2, weight2 = as_dtype(norm2.mean, rstd2.dtype), as_dtype(norm2.weight, rstd2.dtype)
    with stage("conv_backward", bottleneck.device):
        act2 = normalized_relu(bottleneck, _folded(norm2), cdt) if activation is None else activation(bottleneck, norm2)
        images = (as_images(as_dtype(d_new, cdt), *grid), as_images(act2, *grid))
        if len(grid) == 4 and act2.device.type == "cpu" and cdt in (torch.bfloat16, torch.float16):
            # PyTorch's CPU 3-D weight gradient from channels_last_3d bf16 tensors is wrong on 2x2x2 maps
            # (relative error ~1, seen with torch 2.14); from contiguous ones it is right.
            images = tuple(t.contiguous() for t in images)
        d_act2, d_w2, _ = _aten.convolution_backward(
            *images, w2c, None, ones, ones, ones, False, zeros, 1, [True, need_weight, False]
        )
    del images
    with stage("norm_backward", bottleneck.device):
        d_pre2 = as_rows(d_act2)  # (a view: the convolution's gradient is channels-last, as its input)
        _aten.threshold_backward.grad_input(d_pre2, act2, 0, grad_input=d_pre2)  # through relu2, in place
        del d_act2, act2
        in_place = len(grid) == 4 and batch_norm_backward_in_place_serves(d_pre2)  # 3-D volumes only: in 2-D
        # the bottleneck-sized third tensor is small, and PyTorch's kernel takes a quarter less time on the CPU
        if training and sync is None and d_pre2.numel() and in_place:
            as_channels = (t.t().unsqueeze(0) for t in (d_pre2, bottleneck))  # (1, C, M) views of the rows
            d_bottleneck, d_g2, d_b2 = batch_norm_backward_in_place(
                *as_channels, weight2, mean2, rstd2, CHUNK_ELEMENTS["cpu"]
            )
            return d_bottleneck.squeeze(0).t(), d_g2, d_b2, d_w2
        if training and sync is None and d_pre2.numel():  # (PyTorch's kernel divides by zero on no rows)
            # PyTorch's own BatchNorm backward from the forward's statistics (the bottleneck is contiguous).
            d_bottleneck, d_g2, d_b2 = _aten.native_batch_norm_backward(
                d_pre2, bottleneck, weight2, None, None, mean2, rstd2, True, 0.0, [True, True, True]
            )
            return d_bottleneck, d_g2, d_b2, d_w2
        # SyncBatchNorm (sums over every process), eval mode (an affine map), an empty batch: from the sums.
        yhat = (bottleneck.to(rstd2.dtype) - mean2).mul_(rstd2)
        d_pre2 = d_pre2.to(rstd2.dtype)
        d_b2, d_g2 = d_pre2.sum(0), (d_pre2 * yhat).sum(0)
        sums = (d_b2, d_g2) if sync is None else sync.sum(d_b2, d_g2)  # the parameters' gradients stay local
        d_bottleneck = input_grad_from_sums(d_pre2, yhat, *sums, weight2 * rstd2, count, training).to(cdt)
    return d_bottleneck, d_g2, d_b2, d_w2


def norm1_backward(
    d_bottleneck, x, norm1: NormMap | Affine, w1c, grad_sum, sums, need_weight: bool, from_w1_grad=False, first=False,
    pool=None, divisor=None,
):  # fmt: skip
    """``Ops.norm1_backward``: norm1 backward over an ``M x C_l`` buffer prefix, in ``row_chunks``. With
    ``a = relu(norm1(x))`` recomputed, ``P = (dY @ W1) * [a > 0]`` is norm1's output gradient and ``dW1 = dY^T @ a``;
    ``P * coef`` (gamma with batch statistics, the eval map's slope otherwise) is added to G's first ``C_l``
    columns, or with ``first`` (the block's last layer: nothing is in those columns yet) written there; the
    gradients' ``coef``-weighted sums are added to ``sums`` (training).
    ``from_w1_grad`` (``norm1_weight_grad_divisors``): ``sum(P * xhat)`` comes from ``dW1`` (``_sum_p_xhat``,
    dividing by ``divisor``, the weight with zeros made ones, when given) instead of a product and a reduction
    over the whole prefix.

    Returns norm1's weight and bias gradients and conv1's weight gradient (None when not needed)."""
    folded = _folded(norm1)
    rstd1, acc, c_in = folded.rstd, folded.scale.dtype, x.shape[1]
    coef = folded.scale if folded.frozen else folded.weight
    d_w1 = d_b1 = d_gx = None  # d_gx: sum(P * x); the sums over every chunk's rows
    for lo, hi in row_chunks(x):
        x_rows, d_y = x[lo:hi], d_bottleneck[lo:hi]
        act = normalized_relu(x_rows, folded, w1c.dtype)
        if need_weight or from_w1_grad:
            d_w1 = _accumulate(d_w1, torch.mm(d_y.t(), act), acc)
        p_grad = torch.mm(d_y, w1c)
        _aten.threshold_backward.grad_input(p_grad, act, 0, grad_input=p_grad)  # through relu1, in place
        del act
        d_b1 = _accumulate(d_b1, p_grad.sum(0, dtype=acc), acc)
        if not from_w1_grad:
            d_gx = _accumulate(d_gx, torch.mul(p_grad, x_rows).sum(0, dtype=acc), acc)
        if first:
            torch.mul(p_grad, coef, out=grad_sum[lo:hi, :c_in])
        else:
            grad_sum[lo:hi, :c_in].addcmul_(p_grad, coef)
        del p_grad
    if from_w1_grad:
        d_g1 = _sum_p_xhat(d_w1, w1c, folded, d_b1, divisor)
    else:
        d_g1 = torch.addcmul(d_gx, folded.mean, d_b1, value=-1.0).mul_(rstd1)
    if sums is not None:
        sums[0].addcmul_(coef, d_b1)
        sums[1].addcmul_(coef, d_g1)
    return d_g1, d_b1, d_w1 if need_weight else None


def _sum_p_xhat(d_w1, w1c, norm1: Affine, sum_p, divisor=None):
    """norm1's weight gradient ``sum(P * xhat)`` per channel from conv1's weight gradient, with no pass over
    ``P``. The activation ``a`` is zero wherever ``P``'s ReLU mask is, so ``sum(P * a) = sum((dY @ W1) * a) =
    sum_k W1[k] * (dY^T @ a)[k]``: the column sums of ``W1 * dW1``. Where ``a`` is not zero it is
    ``weight * xhat + bias``, so ``weight * sum(P * xhat) = sum(P * a) - bias * sum(P)``. (A zero weight
    leaves ``a`` and ``P`` zero: its channel's gradient is that difference, zero.)"""
    sum_p_act = torch.mul(w1c, as_dtype(d_w1, sum_p.dtype)).sum(0)
    weighted = sum_p_act.addcmul_(norm1.bias, sum_p, value=-1.0)  # weight * sum(P * xhat)
    return weighted.div_(_divisors(norm1.weight) if divisor is None else divisor)


def _divisors(weight: Tensor) -> Tensor:
    """A weight with its zeros made ones: what ``_sum_p_xhat`` divides by."""
    return torch.where(weight != 0, weight, 1.0)


def norm1_weight_grad_divisors(weights: list[Tensor], biases: list[Tensor], compute_dtype: torch.dtype):
    """``Ops.norm1_weight_grad_divisors``: per layer of a block, ``_sum_p_xhat``'s divisor (the weight, zeros made
    ones) where ``norm1_backward`` takes ``sum(P * xhat)`` from conv1's weight
    gradient (``norm1_weight_grad_serves``), else None: one concatenation of the block's weights for both."""
    serves, weight = _serving(weights, biases, compute_dtype)
    if not any(serves):
        return [None] * len(weights)
    divisors = _divisors(weight).split([w.numel() for w in weights])
    return [divisor if serving else None for divisor, serving in zip(divisors, serves, strict=True)]


def norm1_weight_grad_serves(weights: list[Tensor], biases: list[Tensor], compute_dtype: torch.dtype) -> list[bool]:
    """Per layer of a block, whether ``norm1_backward`` takes
    ``sum(P * xhat)`` from conv1's weight gradient (``_sum_p_xhat``). That subtracts ``bias * sum(P)`` from
    ``sum(P * a)``, which amplifies the rounding of the recomputed activation ``a`` by about
    ``bias / |weight|`` (a negative bias only shrinks ``a``); so it serves where every channel of the layer's
    norm1 has ``bias <= WEIGHT_GRAD_BIAS_BOUND * |weight|``. Other layers take the product and reduction.

    One read on the host per block: none under CUDA graph capture (which forbids it: the product is taken
    there), none on fake tensors (the traffic counter's: counted as serving, as for fresh weights and
    torchvision's pretrained ones, whose norm1 biases are all below their weights' magnitude)."""
    return _serving(weights, biases, compute_dtype)[0]


def _serving(weights, biases, compute_dtype) -> tuple[list[bool], Tensor | None]:
    """``norm1_weight_grad_serves``' answer and the block's weights concatenated (None where it read none)."""
    if not weights:
        return [], None
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    if is_fake(weights[0]):
        return [True] * len(weights), weight
    if weights[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return [False] * len(weights), None
    bound = WEIGHT_GRAD_BIAS_BOUND[compute_dtype]
    bias = torch.cat(biases) if len(biases) > 1 else biases[0]
    serves = (bias <= weight.abs().mul_(bound)).cpu()  # one host read for the block
    return [bool(part.all()) for part in serves.split([w.numel() for w in weights])], weight


def _accumulate(total: Tensor | None, part: Tensor, acc: torch.dtype) -> Tensor:
    """``part`` alone (one chunk: no extra operator), else the running sum in the accumulation dtype."""
    return part if total is None else total.to(acc).add_(part)


def finalize(g: Tensor, x: Tensor, d_out: Tensor, stats, noise: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``Ops.finalize``: a segment's input gradient from its column range of G, of the buffer and of the
    output gradient, computed in G's dtype and returned in ``dtype``. ``stats``: ``(mean, rstd, sum_g,
    sum_gx)`` per channel in training,
    None in eval (frozen statistics: each norm1 is an affine map, already in G). ``noise``: the layer's
    dropout multiplier, applied last (dropout backward).

    Training: ``dx = (g - sum_g/m - xhat * sum_gx/m) * rstd + d_out``. Without the sums (``Ops.
    finalize_takes_sums`` is False: the block keeps none, but with SyncBatchNorm) that is PyTorch's BatchNorm
    backward of ``g`` with weight 1 (one operator, which sums as it goes), plus ``d_out``; with them it is
    folded into ``g * rstd + x * b + c`` per channel: three passes."""
    if stats is None or g.shape[0] == 0:  # eval; an empty batch (PyTorch's kernel would divide by no rows)
        d_x = g + d_out
    elif stats[2] is None:
        mean, rstd = stats[:2]
        d_x = _aten.native_batch_norm_backward(g, x, None, None, None, mean, rstd, True, 0.0, [True, False, False])[0]
        d_x.add_(d_out)
    else:
        mean, rstd, sum_g, sum_gx = stats  # G is gamma-scaled already: the fold's scale is rstd
        b, c = folded_input_grad(rstd, rstd, mean, sum_g, sum_gx, g.shape[0])
        d_x = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        torch.addcmul(c, g, rstd, out=d_x).addcmul_(x, b).add_(d_out)
    d_x = d_x.mul_(noise) if noise is not None else d_x
    return as_dtype(d_x, dtype)


TORCH_OPS = Ops(
    column_stats=column_stats,
    bottleneck=bottleneck,
    new_features=conv3x3_into,
    new_features_backward=conv3x3_norm2_backward,
    norm1_backward=norm1_backward,
    norm1_weight_grad_divisors=norm1_weight_grad_divisors,
    norm2_relu_training=norm2_relu_training,
    finalize=finalize,
    fold_maps=fold_many,
    grad_in_buffer_dtype=True,
    norm1_writes_first=True,
    variance_from_rstd=True,
    finalize_takes_sums=False,
)

# What ``torch.export`` traces of an eval-mode block (``FastDenseBlock._exported_forward``): the same operations
# without PyTorch's multi-tensor operators, which neither exporter lowers (each map folded where it is used).
EXPORT_OPS = replace(TORCH_OPS, fold_maps=None, multi_tensor=False)
