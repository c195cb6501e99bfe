"""BatchNorm -> ReLU -> pooling as one autograd node that recomputes instead of storing.

Used for the stem (norm0-relu0-pool0), the transitions (norm-relu-avgpool, before the 1x1 conv) and
the head (norm5-relu-global average pool), of 1-D, 2-D and 3-D networks (MONAI's too). Autograd
would keep the BatchNorm output (the size of the input) and, for max pooling, int64 indices; this op
keeps its input and the per-channel statistics (and a max pool's indices and output, a quarter of the
input in 2-D, an eighth in 3-D) and recomputes the rest in backward in a few whole-tensor passes:
the folded affine map and the ReLU (average pools only), the pool's backward, PyTorch's BatchNorm
backward. With the Triton backend the 2-D forward is one kernel (``kernels.bn_relu_pool``)
after a statistics reduction (1-D and 3-D run PyTorch's ops); the backward is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .batchnorm import (
    Affine,
    KnownStats,
    NormMap,
    accumulation_dtype,
    affine,
    batch_norm_backward_in_place,
    batch_stats,
    input_grad_from_sums,
    native_training_norm,
    running_stats,
    shared_batch_stats,
    update_running_stats,
)
from .foreign import timm_norm_relu
from .layout import as_images, as_rows
from .observed import hooked, watched
from .stages import stage
from .torch_ops import (
    CHUNK_ELEMENTS,
    batch_norm_backward_in_place_serves,
    column_var_mean,
    device_type,
    normalized_relu,
)
from .triton_ops import check_dtypes
from .validation import autocast_enabled, autocast_off, check_rank

# BatchNorm and the pools that go with it, per number of spatial dimensions.
NORMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
POOLS = {nn.AvgPool1d: 1, nn.MaxPool1d: 1, nn.AvgPool2d: 2, nn.MaxPool2d: 2, nn.AvgPool3d: 3, nn.MaxPool3d: 3}
AVERAGE_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def norm_dims(norm: nn.Module) -> int | None:
    """The spatial dimensions of the BatchNorm this op can stand for: a plain ``BatchNorm1d/2d/3d`` or timm's
    ``BatchNormAct2d`` with its ReLU inside (``foreign.timm_norm_relu``); None for any other module."""
    return NORMS.get(type(norm)) or (2 if timm_norm_relu(norm) else None)


def fusable(norm: nn.Module, relu: nn.Module | None, pool: nn.Module) -> bool:
    """Whether ``pool(relu(norm(x)))`` is the plain computation this op reproduces, with nothing watching
    the modules (``observed.watched``: hooks, a counting dispatch mode). ``relu`` is None where ``norm``
    applies the ReLU itself (timm's ``BatchNormAct2d``).

    Never under ``torch.compile``: there the modules run one by one and the compiler fuses them itself
    (only the dense block, which writes a buffer in place, stays an opaque operator)."""
    modules = [m for m in (norm, relu, pool) if m is not None]
    dims = norm_dims(norm)
    relu_ok = type(relu) is nn.ReLU if type(norm) in NORMS else relu is None
    return (
        not torch.compiler.is_compiling()
        and dims is not None
        and relu_ok
        and norm.affine
        and norm.track_running_stats
        and POOLS.get(type(pool)) == dims
        and not (isinstance(pool, AVERAGE_POOLS) and getattr(pool, "divisor_override", None) is not None)
        and not watched(*modules)
    )


def _pooled(act: Tensor, pool: nn.Module) -> Tensor:
    """``pool(act)``. PyTorch has no CPU bfloat16/float16 kernel for 3-D average pooling (autocast runs it
    in float32): those pool in float32, rounded back."""
    if act.device.type == "cpu" and act.dtype in (torch.bfloat16, torch.float16) and isinstance(pool, nn.AvgPool3d):
        return pool(act.float()).to(act.dtype)
    return pool(act)


def _pool_backward(grad: Tensor, act: Tensor, pool: nn.Module) -> Tensor:
    """The pool's input gradient at ``act``. An average pool's is PyTorch's backward operator, which
    needs no forward; a max pool's is its own autograd on the recomputed activation (it finds its window
    maxima again instead of keeping int64 indices for the whole backward)."""
    backward = _AVERAGE_POOL_BACKWARD.get(type(pool))
    half_on_cpu = act.device.type == "cpu" and act.dtype in (torch.bfloat16, torch.float16)
    if backward is not None and not (half_on_cpu and isinstance(pool, nn.AvgPool3d)):
        return backward(grad.to(act.dtype), act, *_window(pool), pool.ceil_mode, pool.count_include_pad, None)
    with torch.enable_grad():
        act = act.detach().requires_grad_()
        (d_act,) = torch.autograd.grad(_pooled(act, pool), act, grad)
    return d_act


_AVERAGE_POOL_BACKWARD = {
    nn.AvgPool2d: torch.ops.aten.avg_pool2d_backward,
    nn.AvgPool3d: torch.ops.aten.avg_pool3d_backward,
}


def _channel(v: Tensor, spatial_dims: int) -> Tensor:
    return v.view(1, -1, *[1] * spatial_dims)


def _reduced_dims(x: Tensor) -> tuple[int, ...]:
    """Every dimension but the channels': what a BatchNorm normalises over."""
    return (0, *range(2, x.dim()))


def _layout(x: Tensor) -> torch.memory_format:
    """The memory format of an output shaped like ``x``: channels-last when ``x`` is."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return channels_last if channels_last and x.is_contiguous(memory_format=channels_last) else torch.contiguous_format


def kernel_window(pool: nn.Module) -> tuple[tuple[int, int], int, int, bool] | None:
    """``(kernel, stride, padding, is_max)`` when the Triton kernel (2-D) reproduces ``pool``, else None."""
    if POOLS.get(type(pool)) != 2:
        return None
    pair = nn.modules.utils._pair
    kernel, stride, padding = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size), pair(pool.padding)
    if pool.ceil_mode or stride[0] != stride[1] or padding[0] != padding[1]:
        return None
    if isinstance(pool, nn.MaxPool2d):
        return (kernel, stride[0], padding[0], True) if pair(pool.dilation) == (1, 1) else None
    return (kernel, stride[0], 0, False) if padding == (0, 0) else None


def check_pool_window(x: Tensor, pool: nn.Module, name: str) -> None:
    """Refuse an input smaller than ``pool``'s window (with its padding) in some spatial dimension: the pool
    would have no output there (PyTorch's pools raise "Output size is too small"; a kernel would write none)."""
    dims = x.dim() - 2
    kernel, padding = (nn.modules.utils._ntuple(dims)(v) for v in (pool.kernel_size, pool.padding))
    if any(size + 2 * p < k for size, k, p in zip(x.shape[2:], kernel, padding, strict=True)):
        raise ValueError(
            f"{name}: input of spatial size {tuple(x.shape[2:])} is smaller than its pool's window {kernel} "
            f"(padding {padding}): no output; give it a larger input"
        )


def global_average_pool(x: Tensor) -> nn.Module:
    """The head's adaptive average pool to size 1 as one window over the whole image or volume (stride 1:
    one output)."""
    pool = {3: nn.AvgPool1d, 4: nn.AvgPool2d, 5: nn.AvgPool3d}[x.dim()]
    return pool(tuple(x.shape[2:]), stride=1)


def norm_statistics(
    x: Tensor, norm: nn.BatchNorm2d, triton: bool = False, known: KnownStats | None = None
) -> tuple[Tensor, Tensor]:
    """The mean and ``1 / sqrt(var + eps)`` ``norm`` normalises ``x`` with: batch statistics in training
    (updating the running statistics, as ``nn.BatchNorm2d`` does), running statistics in eval.

    Batch statistics are, in order: ``known``; those a dense block recorded for this very tensor
    (``share_batch_stats``); else a reduction, Triton's (``triton``: one launch over channels_last rows for
    the mean, variance and rstd) or PyTorch's."""
    acc, count = accumulation_dtype(x.dtype), x.numel() // max(x.shape[1], 1)
    if not norm.training:
        return running_stats(norm, acc)
    known = known or shared_batch_stats(x)
    if known is None and triton:
        from fastdense.kernels.stats import column_stats

        known = KnownStats(column_stats(as_rows(x), norm.eps), norm.eps)
    if known is not None:
        mean, var, rstd = known.mean_var_rstd(norm.eps, acc)
    else:
        if _layout(x) != torch.contiguous_format:
            var, mean = column_var_mean(as_rows(x))  # channels-last: a view
        else:
            var, mean = batch_stats(x, dim=_reduced_dims(x))
        rstd = torch.rsqrt(var + norm.eps)
    update_running_stats(norm, mean, var, count)
    return mean, rstd


class BatchNormReLUPool(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        conv_weight: Tensor | None,
        weight: Tensor,
        bias: Tensor,
        norm: nn.BatchNorm2d,
        pool: nn.Module,
        backend: str,
        part: str,
        conv: nn.Module | None,
        cast: torch.dtype | None,
    ):
        # With ``conv`` (the stem's conv0), ``x`` is its input: its output, the network's largest
        # activation, is not kept but computed again in backward. ``cast``: autocast's dtype for its weight.
        y = x if conv is None else _convolved(x, conv_weight, conv, cast)
        window = kernel_window(pool) if backend == "triton" else None  # 1-D and 3-D: PyTorch's ops
        indices = folded = None
        if window is not None:
            out, mean, rstd = _triton_forward(y, norm, window)
            if mean is None and any(ctx.needs_input_grad):  # eval: the backward's map from the running statistics
                mean, rstd = running_stats(norm, accumulation_dtype(y.dtype))
        else:
            out, indices, mean, rstd, folded = _torch_forward(y, weight, bias, norm, pool)
        del y
        # With a max pool's indices the backward needs its output too (the ReLU mask at each window's maximum);
        # an average pool's recomputes the activation with the forward's folded map (its two vectors, kept).
        scale, shift = (None, None) if folded is None else (folded.scale, folded.shift)
        pooled = out if indices is not None else None
        ctx.save_for_backward(x, conv_weight, weight, bias, mean, rstd, indices, pooled, scale, shift)
        ctx.pool, ctx.training, ctx.part, ctx.conv, ctx.cast = pool, norm.training, part, conv, cast
        ctx.kernel_map = window is not None  # the backward recomputes the activation with the kernel's map
        return out

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable: say so, loudly
    def backward(ctx, grad_out: Tensor):
        x, conv_weight, weight, bias, mean, rstd, indices, pooled, scale, shift = ctx.saved_tensors
        conv, need_x, need_conv_weight = ctx.conv, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with stage(f"{ctx.part}_backward", x.device):
            y = x if conv is None else _convolved(x, conv_weight, conv, ctx.cast)
            need_y = need_x or conv is not None  # (a convolution's weight gradient needs it)
            d_y, d_weight, d_bias = _backward(
                grad_out, y, weight, bias, mean, rstd, (indices, pooled), ctx.pool, ctx.training, need_y,
                ctx.kernel_map, (scale, shift),
            )  # fmt: skip
            del y
            d_x, d_conv_weight = d_y, None
            if conv is not None and (need_x or need_conv_weight):
                needs = (need_x, need_conv_weight)
                d_x, d_conv_weight = _convolution_backward(d_y, x, conv_weight, conv, ctx.cast, *needs)
        return d_x, d_conv_weight, d_weight, d_bias, None, None, None, None, None, None


def recomputable(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain bias-free convolution (the stem's conv0) that ``bn_relu_pool`` can run
    and run again in backward instead of keeping its output."""
    return (
        type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not hooked(conv)
    )


def _convolved(x: Tensor, weight: Tensor, conv: nn.Module, cast: torch.dtype | None) -> Tensor:
    """``conv(x)`` with ``weight``, cast to ``cast`` (autocast's dtype) when given, as autocast casts it."""
    functional = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(conv)]
    weight = weight if cast is None else weight.to(cast)
    return functional(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _convolution_backward(d_y, x, weight, conv: nn.Module, cast: torch.dtype | None, need_x: bool, need_weight: bool):
    """The gradients of a ``_convolved`` input and weight (None where not needed)."""
    zeros = [0] * (x.dim() - 2)
    d_x, d_weight, _ = torch.ops.aten.convolution_backward(
        d_y.to(x.dtype), x, weight if cast is None else weight.to(cast), None, conv.stride, conv.padding,
        conv.dilation, False, zeros, conv.groups, [need_x, need_weight, False],
    )  # fmt: skip
    return d_x, d_weight.to(weight.dtype) if d_weight is not None else None


def _torch_forward(x: Tensor, weight: Tensor, bias: Tensor, norm: nn.BatchNorm2d, pool: nn.Module):
    """``(pooled, indices, mean, rstd, folded)``: a 2-D or 3-D max pool's window indices are kept for the
    backward (a quarter (an eighth) of the input's elements; int32 on the CPU, PyTorch's int64 elsewhere),
    so that it recomputes nothing; None for other pools. ``folded``: the map the activation came from, when
    it was folded here (``Affine``), else None."""
    max_pool = type(pool) in _MAX_POOL_BACKWARD
    folded = None
    if max_pool and _native_norm_serves(x, norm):
        act, mean, rstd = _native_training_norm(x, weight, bias, norm)
        act.relu_()
    else:
        mean, rstd = norm_statistics(x, norm)
        folded = affine(weight, bias, mean, rstd)
        act = _normalized_relu(x, folded)
    if max_pool:
        out, indices = getattr(F, _MAX_POOL[type(pool)])(act, *_max_window(pool), return_indices=True)
        if device_type(x) == "cpu" and math.prod(x.shape[2:]) < 2**31:  # half the memory; on a GPU, traffic
            indices = indices.to(torch.int32)  # (an index into one channel's map)
        return out, indices, mean, rstd, folded
    return _pooled(act, pool), None, mean, rstd, folded


def _native_norm_serves(x: Tensor, norm: nn.BatchNorm2d) -> bool:
    """Whether a training forward takes its batch statistics and normalised output from one PyTorch
    BatchNorm call (``_native_training_norm``): when no statistics of ``x`` are known (the stem's; a
    transition reads its block's), the batch is not empty, the momentum is a number (the cumulative
    average, ``momentum=None``, would read ``num_batches_tracked`` on the host) and the running statistics
    are in the accumulation dtype (PyTorch's mixed-precision BatchNorm takes them so). Only before a max pool,
    whose backward keeps the window indices and recomputes nothing: an average pool's backward
    recomputes the activation with the folded map, which must give the forward's ReLU masks."""
    return (
        norm.training
        and x.numel() > 0
        and norm.momentum is not None
        and norm.running_mean.dtype == norm.running_var.dtype == accumulation_dtype(x.dtype)
        and shared_batch_stats(x) is None
    )


def _native_training_norm(x: Tensor, weight: Tensor, bias: Tensor, norm: nn.BatchNorm2d):
    """``(norm(x), mean, rstd)`` from ``batchnorm.native_training_norm``, which also updates ``norm``'s
    running statistics (``num_batches_tracked`` here), instead of a reduction of several passes then the
    folded map."""
    norm.num_batches_tracked.add_(1)
    running = (norm.running_mean, norm.running_var)
    return native_training_norm(x, weight, bias, norm.eps, running, norm.momentum)


# Names, looked up in torch.nn.functional when called: a tool that patches F.max_pool2d (ptflops) sees the call.
_MAX_POOL = {nn.MaxPool2d: "max_pool2d", nn.MaxPool3d: "max_pool3d"}
_MAX_POOL_BACKWARD = {
    nn.MaxPool2d: torch.ops.aten.max_pool2d_with_indices_backward,
    nn.MaxPool3d: torch.ops.aten.max_pool3d_with_indices_backward,
}


def _window(pool: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A pool's ``(kernel, stride, padding)``, one entry per spatial dimension, as PyTorch's operators take them."""
    tuple_of = nn.modules.utils._ntuple(POOLS[type(pool)])
    kernel = tuple_of(pool.kernel_size)
    return kernel, tuple_of(pool.stride) if pool.stride is not None else kernel, tuple_of(pool.padding)


def _max_window(pool: nn.Module) -> tuple:
    """A max pool's ``(kernel, stride, padding, dilation, ceil_mode)``, in the order of PyTorch's max-pool
    operators and their backward."""
    return *_window(pool), nn.modules.utils._ntuple(POOLS[type(pool)])(pool.dilation), pool.ceil_mode


def _normalized_relu(x: Tensor, folded: Affine) -> Tensor:
    """``relu(norm(x))`` in ``x``'s dtype and layout (``torch_ops.normalized_relu``, the folded map's vectors
    shaped per channel). The backward recomputes it with the same vectors."""
    return normalized_relu(x, folded.channels(0, x.shape[1], x.dim() - 2), x.dtype)


def _kernel_activation(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """``relu(norm(x))`` of an ``(N, C, H, W)`` map by the Triton BN-ReLU-pool kernel with a 1x1 window."""
    from fastdense.kernels.bn_relu_pool import bn_relu_pool as pool_kernel

    x = x.contiguous(memory_format=torch.channels_last)
    return pool_kernel(x, NormMap(mean, rstd, weight, bias), 1, 1, 0, False)


def _triton_norm(x: Tensor, norm: nn.BatchNorm2d, compute_dtype: torch.dtype, known=None):
    """``(mean, rstd, map)``: the statistics (training: known ones, else the Triton reduction; eval: the
    running ones, left to the kernel as they are: ``mean`` and ``rstd`` None) and the kernels' ``NormMap``."""
    check_dtypes(x, compute_dtype)
    if not norm.training:
        return None, None, NormMap.running(norm)
    mean, rstd = norm_statistics(x, norm, triton=True, known=known)
    return mean, rstd, NormMap(mean, rstd, norm.weight, norm.bias)


def _triton_forward(x: Tensor, norm: nn.BatchNorm2d, window, out: Tensor | None = None, known=None):
    """``pool(relu(norm(x)))`` by the Triton kernel (``window``: ``kernel_window(pool)``), written into
    ``out`` rows when given; ``known``: batch statistics of ``x`` (``KnownStats``). Returns the result
    and the statistics used (None in eval: the kernel read the running ones as they are)."""
    from fastdense.kernels.bn_relu_pool import bn_relu_pool as pool_kernel

    x = x.contiguous(memory_format=torch.channels_last)  # the stem's conv0 output may not be
    mean, rstd, norm_map = _triton_norm(x, norm, x.dtype, known)
    return pool_kernel(x, norm_map, *window, out=out), mean, rstd


def triton_bn_relu_pool_into(x: Tensor, norm: nn.BatchNorm2d, pool: nn.Module, out: Tensor | None, known=None):
    """No-autograd ``pool(relu(norm(x)))`` by the Triton kernel, written into ``out`` rows when given
    (e.g. the first channels of a block buffer); ``known``: batch statistics of ``x`` (``KnownStats``)."""
    with stage("bn_relu_pool", x.device):
        return _triton_forward(x, norm, kernel_window(pool), out, known)[0]


def fused_transition(
    x: Tensor, norm: nn.BatchNorm2d, conv_weight: Tensor, compute_dtype: torch.dtype, out=None, known=None
) -> Tensor:
    """``conv1x1(avgpool2x2(relu(norm(x))))`` as one Triton GEMM whose prologue pools (no autograd:
    for inference and ``torch.no_grad``), written into ``out`` rows when given (the next block's buffer);
    ``known``: batch statistics of ``x`` (``KnownStats``).
    Returns a channels_last ``(N, C_out, H // 2, W // 2)`` tensor (a view of ``out`` when given)."""
    from fastdense.kernels.bn_relu_gemm import bn_relu_gemm

    n, c, h, w = x.shape
    _, _, norm_map = _triton_norm(x, norm, compute_dtype, known)
    c_out = conv_weight.shape[0]
    weight = conv_weight.to(compute_dtype).view(c_out, c)
    with stage("transition", x.device):
        out = bn_relu_gemm(as_rows(x), norm_map, weight, pool_hw=(h, w), out=out)
    return as_images(out, n, h // 2, w // 2)


def _backward(grad_out, x, weight, bias, mean, rstd, max_pooled, pool, training: bool, need_input_grad: bool,
              kernel_map: bool = False, scale_shift=(None, None)):  # fmt: skip
    """Back through the pool and the ReLU, then through the BatchNorm: PyTorch's own BatchNorm backward in
    training (the statistics are the forward's), the affine map's in eval.

    ``max_pooled``: a max pool's ``(indices, output)`` from the forward, or ``(None, None)``. With them
    nothing is recomputed: the ReLU's mask at a window's maximum is the pooled output's sign, so the
    output gradient is masked first (a pooled-size pass) and scattered back by the indices. Otherwise
    ``relu(norm(x))`` is recomputed for the pool's backward and the mask: by the Triton kernel with a 1x1
    window when the forward ran the kernel (``kernel_map``: one pass, and the forward's map and rounding, so
    the forward's ReLU masks), else with the folded map (``scale_shift``: its vectors, when the forward kept
    them)."""
    indices, pooled = max_pooled
    with autocast_off(x.device.type), stage("bn_relu_pool_backward", x.device):
        if indices is not None:
            masked = torch.ops.aten.threshold_backward(grad_out.to(pooled.dtype), pooled, 0)  # through the ReLU
            backward = _MAX_POOL_BACKWARD[type(pool)]
            d_pre = backward(masked, x, *_max_window(pool), indices.long())  # x: the shape only
            del masked
        else:
            if kernel_map:
                act = _kernel_activation(x, weight, bias, mean, rstd)
            elif scale_shift[0] is not None:
                act = _normalized_relu(x, Affine(mean, scale_shift[0], bias, scale_shift[1], weight, rstd))
            else:
                act = _normalized_relu(x, affine(weight, bias, mean, rstd))
            d_pre = _pool_backward(grad_out, act, pool)
            torch.ops.aten.threshold_backward.grad_input(d_pre, act, 0, grad_input=d_pre)  # through the ReLU
            del act
        if training and x.numel() and x.dim() > 4 and batch_norm_backward_in_place_serves(x):
            d_x, d_weight, d_bias = batch_norm_backward_in_place(d_pre, x, weight, mean, rstd, CHUNK_ELEMENTS["cpu"])
        elif training and x.numel():  # (PyTorch's kernel divides by zero on an empty batch)
            d_x, d_weight, d_bias = torch.ops.aten.native_batch_norm_backward(
                d_pre, x, weight.to(mean.dtype), None, None, mean, rstd, True, 0.0, [need_input_grad, True, True]
            )
        else:
            d_x, d_weight, d_bias = _affine_backward(d_pre, x, weight, mean, rstd, training, need_input_grad)
    return d_x, d_weight.to(weight.dtype), d_bias.to(bias.dtype)


def _affine_backward(d_pre, x, weight, mean, rstd, training: bool, need_input_grad: bool):
    """BatchNorm's backward from its output gradient, as sums (an empty batch in training; eval mode,
    where the map is affine)."""
    spatial_dims, dims = x.dim() - 2, _reduced_dims(x)
    d_pre = d_pre.to(mean.dtype)
    xhat = (x - _channel(mean, spatial_dims)).mul_(_channel(rstd, spatial_dims))
    d_bias, d_weight = d_pre.sum(dims), (d_pre * xhat).sum(dims)
    d_x = None
    if need_input_grad:
        scale = _channel(weight.to(rstd.dtype) * rstd, spatial_dims)
        sums = (_channel(d_bias, spatial_dims), _channel(d_weight, spatial_dims))
        count = x.numel() // max(x.shape[1], 1)
        d_x = input_grad_from_sums(d_pre, xhat, *sums, scale, count, training).to(x.dtype)
    return d_x, d_weight, d_bias


# How an error names the part of the network whose input it refuses.
PART_NAMES = {"stem": "the stem (conv0, norm0, pool0)", "transition": "a transition", "head": "the head (norm5)"}


def bn_relu_pool(
    x: Tensor,
    norm: nn.BatchNorm2d,
    pool: nn.Module,
    backend: str = "torch",
    part: str = "stem",
    conv: nn.Module | None = None,
) -> Tensor:
    """``pool(relu(norm(x)))`` with ``norm``'s training/eval semantics and running-stat updates;
    ``backend`` is a resolved backend ("torch" or "triton"); ``part`` names the stage it runs in
    ("stem", "transition" or "head", and its backward "<part>_backward"). ``conv`` (``recomputable``):
    ``pool(relu(norm(conv(x))))``, the convolution's output computed again in backward, not kept."""
    check_rank(x, norm_dims(norm) or 2, PART_NAMES.get(part, part))
    cast = None
    if conv is not None and x.dtype == torch.float32 and autocast_enabled(x.device.type):
        cast = torch.get_autocast_dtype(x.device.type)  # the convolution runs in it, as nn.Conv would
        x = x.to(cast)
    positions = math.prod(x.shape[2:]) if conv is None else _positions(x, conv)
    if norm.training and x.shape[0] * positions == 1:
        raise ValueError(
            f"{PART_NAMES.get(part, part)}: expected more than 1 value per channel when training (BatchNorm batch "
            f"statistics), got input size {tuple(x.shape)}; use a larger batch or call .eval()"
        )
    conv_weight = None if conv is None else conv.weight
    with autocast_off(x.device.type), stage(part, x.device), stage("bn_relu_pool", x.device):
        return BatchNormReLUPool.apply(x, conv_weight, norm.weight, norm.bias, norm, pool, backend, part, conv, cast)


def _positions(x: Tensor, conv: nn.Module) -> int:
    """The number of positions of ``conv``'s output on ``x``."""
    size = 1
    for length, k, s, p, d in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation, strict=True):
        size *= (length + 2 * p - d * (k - 1) - 1) // s + 1
    return size
