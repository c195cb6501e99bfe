"""The ``torch`` backend of a dense block: DESIGN.md sections 2 and 4 written with plain PyTorch ops.

One channels_last buffer per block holds every feature map; seen as a row-major ``M x C_total``
matrix (``M = N*H*W``), layer ``l`` reads the column prefix ``[0, C_l)`` and writes its ``k`` new
columns in place. Training-mode batch statistics of a column are computed once, when it is written,
and shared by every BatchNorm that reads it. The backward recomputes the normalised activations from
the buffer and sums every consumer's BatchNorm gradient into one gradient buffer ``G``, finalising each
segment once (the derivation is in DESIGN.md section 4).

Precision: the buffer keeps the input's dtype (as ``torch.cat`` would); GEMMs and convolutions run
in the compute dtype (the autocast dtype under autocast, else the input's dtype); statistics,
normalisation and gradient sums run in the accumulation dtype (float64 for float64 inputs, float32
otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batchnorm import (
    Affine,
    accumulation_dtype,
    affine,
    batch_stats,
    chunks,
    input_grad_from_sums,
    running_stats,
    update_running_stats,
)
from .stages import stage
from .sync_batchnorm import StatsSync

# Per-layer parameters in the order they are passed to the block operator (fastdense.block_op).
PARAMS_PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight


class RunningNorm(NamedTuple):
    """What the block forward reads of a BatchNorm module: its running statistics (eval) and eps. A
    BatchNorm module itself serves as one too."""

    running_mean: Tensor
    running_var: Tensor
    eps: float


@dataclass
class BlockPlan:
    """What a block forward needs besides the tensors: each BatchNorm's running statistics, settings."""

    norms1: list[RunningNorm | nn.BatchNorm2d]
    norms2: list[RunningNorm | nn.BatchNorm2d]
    drop_rates: list[float]
    growth_rate: int
    training: bool
    keep_bottlenecks: bool  # memory_efficient=False keeps each layer's 1x1 conv output for backward
    compute_dtype: torch.dtype
    eps1: float  # shared by every norm1 of the block (checked by the module)
    ops: Ops | None = None  # the forward's kernels: None means TORCH_OPS; fastdense.triton_backend has the others
    # Per layer: dropout zeroes whole channels of a sample (MONAI's Dropout2d/3d) instead of single values.
    channelwise_dropout: tuple[bool, ...] = ()
    sync: StatsSync | None = None  # SyncBatchNorm: batch statistics over the processes of a group


@dataclass(frozen=True)
class Ops:
    """The three forward kernels of a dense block. The torch backend's are plain PyTorch ops; the
    Triton backend's fuse them (``fastdense.triton_backend``). Both keep the same buffer layout and
    return the same statistics, so one backward serves both.

    column_stats(cols) -> (var, mean): biased batch statistics of an ``M x c`` buffer slice.
    bottleneck(x, norm1, w1, stats, epilogue) -> (Y, (var, mean) or None): ``relu(norm1(x)) @ w1^T`` for
        an ``M x C_l`` buffer prefix (``w1``: ``4k x C_l``, compute dtype); ``stats``: Y's column
        statistics (training); ``epilogue``: an eval-mode norm2 map applied with relu2 to Y.
    new_features(Y, norm2, w2, grid, out, noise, stats) -> (var, mean) or None: writes
        ``conv3x3(relu(norm2(Y))) * noise`` into the ``M x k`` buffer slice ``out`` (``norm2`` None: Y is
        already activated; ``noise`` None: no dropout) and returns the slice's statistics with ``stats``;
        ``grid`` is ``(N, *spatial)``.
    fuses_eval_norm2: whether ``bottleneck`` takes an ``epilogue``.
    norm1_backward: the backward of ``bottleneck`` (``_norm1_backward``'s contract); None: PyTorch's.
    finalize: a segment's input gradient (``_finalize``'s contract); None: PyTorch's.
    """

    column_stats: Callable
    bottleneck: Callable
    new_features: Callable
    fuses_eval_norm2: bool = False
    norm1_backward: Callable | None = None
    finalize: Callable | None = None


@dataclass
class LayerState:
    """Per-layer tensors the backward reads (everything else is recomputed from the buffer)."""

    # The running statistics norm1 used in eval; None in training, where they are the prefix
    # [0, C_l) of the block's shared batch statistics (BlockState.seg_mean, seg_rstd).
    mean1: Tensor | None
    rstd1: Tensor | None
    mean2: Tensor
    rstd2: Tensor
    bottleneck: Tensor | None = None  # M x 4k, only when keep_bottlenecks
    dropout_noise: Tensor | None = None  # M x k, mask / (1 - p), only with dropout in training


@dataclass
class BlockState:
    layers: list[LayerState] = field(default_factory=list)
    seg_mean: Tensor | None = None  # training: per-channel batch mean of the whole buffer
    seg_rstd: Tensor | None = None  # training: per-channel 1 / sqrt(var + eps1)
    # Training, not saved for backward: the biased variance of the buffer (for the running statistics
    # and the next BatchNorm) and each layer's norm2 batch statistics (for its running statistics).
    seg_var: Tensor | None = None
    norm2_stats: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (var, mean) per layer
    count: int = 0  # training: the rows the statistics are over (every process's, with SyncBatchNorm)

    # The state goes through ctx.save_for_backward (not ctx attributes), so that autograd frees it
    # after backward like any saved tensor instead of keeping it as long as the graph is referenced.
    def flatten(self) -> list[Tensor | None]:
        per_layer = [getattr(s, f.name) for s in self.layers for f in fields(s)]  # astuple would deep-copy
        return [self.seg_mean, self.seg_rstd, *per_layer]

    @classmethod
    def unflatten(cls, tensors: list[Tensor | None]) -> BlockState:
        n = len(fields(LayerState))
        layers = [LayerState(*tensors[i : i + n]) for i in range(2, len(tensors), n)]
        return cls(layers, tensors[0], tensors[1])


class BatchStats(NamedTuple):
    """A training forward's batch statistics, biased, in the accumulation dtype: of the buffer's channels
    (every norm1 reads a prefix of them) and of each layer's bottleneck (``L x 4k``, its norm2), and the
    number of rows they are over (a 0-dim float64 tensor: every process's rows with SyncBatchNorm)."""

    var: Tensor
    mean: Tensor
    var2: Tensor
    mean2: Tensor
    count: Tensor


def batch_stats_of(state: BlockState) -> BatchStats:
    var2, mean2 = (torch.stack(s) for s in zip(*state.norm2_stats, strict=True))
    count = torch.full((), state.count, dtype=torch.float64, device=var2.device)
    return BatchStats(state.seg_var, state.seg_mean, var2, mean2, count)


def update_block_running_stats(norms1, norms2, stats: BatchStats, count: int | Tensor, growth_rate: int) -> None:
    """The running-statistics updates of every BatchNorm of a block after a training forward (outside the
    forward itself, so that the forward is a pure function of its inputs for ``torch.compile``)."""
    c0 = stats.mean.shape[0] - len(norms1) * growth_rate
    for layer, (norm1, norm2) in enumerate(zip(norms1, norms2, strict=True)):
        c_in = c0 + layer * growth_rate
        update_running_stats(norm1, stats.mean[:c_in], stats.var[:c_in], count)
        update_running_stats(norm2, stats.mean2[layer], stats.var2[layer], count)


def as_images(rows: Tensor, n: int, *spatial: int) -> Tensor:
    """An ``M x C`` matrix (any row stride: a buffer's column slice too) seen as an ``(N, C, *spatial)``
    channels-last tensor (``(N, C, H, W)`` or ``(N, C, D, H, W)``), without a copy."""
    return rows.unflatten(0, (n, *spatial)).movedim(-1, 1)


def as_rows(t: Tensor) -> Tensor:
    """An ``(N, C, *spatial)`` tensor as an ``M x C`` matrix with adjacent columns, as the kernels take
    it: a view when it is channels-last (or a channel slice of such), else a copy."""
    c = t.shape[1]
    rows = t.movedim(1, -1).reshape(-1, c)
    return rows if c <= 1 or rows.stride(1) == 1 else rows.contiguous()


def _conv3x3(images: Tensor, weight: Tensor) -> Tensor:
    """The layer's 3x3 (3x3x3, ...) convolution with padding 1, for 1 to 3 spatial dimensions."""
    return _CONV_FUNCTIONS[images.dim() - 2](images, weight, padding=1)


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _bottleneck(x: Tensor, norm1: Affine, w1_t: Tensor) -> Tensor:
    """``relu(norm1(x)) @ W1^T`` for an ``M x C_l`` prefix of the buffer: the GEMM prologue of
    DESIGN.md in row chunks, so the normalised activations never exist for all rows at once."""
    out = torch.empty((x.shape[0], w1_t.shape[1]), dtype=w1_t.dtype, device=x.device)
    for lo, hi in chunks(x.shape[0], x.shape[1]):
        act = norm1(x[lo:hi]).relu_().to(w1_t.dtype)
        torch.mm(act, w1_t, out=out[lo:hi])
    return out


def _column_stats(cols: Tensor) -> tuple[Tensor, Tensor]:
    return batch_stats(cols, dim=0)


def _torch_bottleneck(x, norm1: Affine, w1: Tensor, stats: bool, epilogue: Affine | None):
    bottleneck = _bottleneck(x, norm1, w1.t())
    return bottleneck, batch_stats(bottleneck, dim=0) if stats else None


def conv3x3_into(bottleneck, norm2: Affine | None, w2, grid, out, noise, stats: bool, column_stats=_column_stats):
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


TORCH_OPS = Ops(column_stats=_column_stats, bottleneck=_torch_bottleneck, new_features=conv3x3_into)


def _layer_params(params: tuple[Tensor, ...], layer: int) -> tuple[Tensor, ...]:
    return params[layer * PARAMS_PER_LAYER : (layer + 1) * PARAMS_PER_LAYER]


def block_forward(
    x: Tensor, params: tuple[Tensor, ...], plan: BlockPlan, save: bool, buffer: Tensor | None = None
) -> tuple[Tensor, BlockState]:
    """Run the block; return the ``(N, C_total, H, W)`` channels_last buffer and the saved state.

    ``x`` is ``(N, C0, *spatial)`` with one to three spatial dimensions. ``buffer``: an
    ``(N, *spatial, C_total)`` tensor whose first ``C0`` channels already hold ``x`` (written there by
    the previous op), used as the block's buffer instead of a new one and a copy."""
    n, c0, *spatial = x.shape
    grid = (n, *spatial)
    k, num_layers = plan.growth_rate, len(plan.drop_rates)
    c_total, m = c0 + num_layers * k, math.prod(grid)
    acc, cdt, ops = accumulation_dtype(x.dtype), plan.compute_dtype, plan.ops or TORCH_OPS
    sync = plan.sync if plan.training else None

    def synced(stats: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return stats if sync is None else sync.stats(stats, m)

    if buffer is None:
        buf = torch.empty((*grid, c_total), dtype=x.dtype, device=x.device)
        buf[..., :c0].copy_(x.movedim(1, -1))
    else:
        buf = buffer
    rows = buf.view(m, c_total)
    state = BlockState()
    if plan.training:
        state.seg_mean = torch.empty(c_total, dtype=acc, device=x.device)
        state.seg_rstd = torch.empty(c_total, dtype=acc, device=x.device)
        seg_var = state.seg_var = torch.empty(c_total, dtype=acc, device=x.device)
        state.count = m if sync is None else sync.total(m, x.device)

        def record_segment_stats(lo: int, hi: int, stats: tuple[Tensor, Tensor]) -> None:
            var, mean = stats
            state.seg_mean[lo:hi], seg_var[lo:hi] = mean, var
            state.seg_rstd[lo:hi] = torch.rsqrt(var.to(acc) + plan.eps1)

        with stage("stats", x.device):
            record_segment_stats(0, c0, synced(ops.column_stats(rows[:, :c0])))

    # Eval mode folds norm2 and relu2 into the GEMM's epilogue when the raw bottleneck is not kept.
    fuse_norm2 = ops.fuses_eval_norm2 and not plan.training and not (save and plan.keep_bottlenecks)
    for layer in range(num_layers):
        g1, b1, w1, g2, b2, w2 = _layer_params(params, layer)
        norm1, norm2, c_in = plan.norms1[layer], plan.norms2[layer], c0 + layer * k
        if plan.training:
            mean1, rstd1 = state.seg_mean[:c_in], state.seg_rstd[:c_in]
        else:
            mean1, rstd1 = running_stats(norm1, acc)
        norm1_map = affine(g1, b1, mean1, rstd1, training=plan.training)
        if not plan.training:
            mean2, rstd2 = running_stats(norm2, acc)
        eval_norm2 = affine(g2, b2, mean2, rstd2, training=False) if fuse_norm2 else None
        with stage("gemm", x.device):
            bottleneck, stats2 = ops.bottleneck(
                rows[:, :c_in], norm1_map, w1.to(cdt).view(-1, c_in), plan.training, eval_norm2
            )  # M x 4k

        if plan.training:
            var2, mean2 = (s.to(acc) for s in synced(stats2))
            state.norm2_stats.append((var2, mean2))
            rstd2 = torch.rsqrt(var2 + norm2.eps)
        norm2_map = None if fuse_norm2 else affine(g2, b2, mean2, rstd2, training=plan.training)

        noise = None
        p = plan.drop_rates[layer]
        if plan.training and p > 0:
            channelwise = bool(plan.channelwise_dropout) and plan.channelwise_dropout[layer]
            noise = dropout_noise(grid, k, p, channelwise, cdt, x.device)
        with stage("conv", x.device):
            stats_new = ops.new_features(
                bottleneck, norm2_map, w2.to(cdt), grid, rows[:, c_in : c_in + k], noise, plan.training
            )
        if plan.training:
            record_segment_stats(c_in, c_in + k, synced(stats_new))
        if save:
            kept = bottleneck if plan.keep_bottlenecks else None
            running1 = (None, None) if plan.training else (mean1, rstd1)
            state.layers.append(LayerState(*running1, mean2, rstd2, kept, noise))
        del bottleneck
    return buf.movedim(-1, 1), state


def dropout_noise(grid, k: int, p: float, channelwise: bool, dtype, device) -> Tensor:
    """The ``M x k`` dropout multiplier of a layer's new features: 0 with probability ``p``, else
    ``1 / (1 - p)``, the distribution of ``F.dropout``; ``channelwise``: one draw per sample and channel,
    shared by all its positions, as ``F.dropout2d`` / ``F.dropout3d`` draw."""
    n, *spatial = grid
    draws = (n, *[1] * len(spatial), k) if channelwise else (*grid, k)
    noise = torch.empty(draws, dtype=dtype, device=device).bernoulli_(1.0 - p)
    noise.mul_(0.0 if p == 1.0 else 1.0 / (1.0 - p))
    return noise.expand(*grid, k).reshape(-1, k)


def _conv2_norm2_backward(
    d_new, bottleneck, norm2: Affine, rstd2, w2c, grid, training: bool, need_weight: bool, sync, count: int
):
    """From the gradient of a layer's new features (dropout already undone) back to its bottleneck:
    3x3 conv, ReLU and norm2 backward, with norm2-ReLU recomputed exactly as the forward did. ``sync``
    (SyncBatchNorm): the input gradient takes the sums over all ``count`` rows of every process.

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


def _norm1_backward(d_bottleneck, x, norm1: Affine, rstd1, w1c, grad_sum, coef, need_weight: bool):
    """norm1 backward over an ``M x C_l`` buffer prefix, in row chunks. With ``u = norm1(x)`` recomputed,
    ``P = (dY @ W1) * [u > 0]`` is norm1's output gradient and ``dW1 = dY^T @ relu(u)``; ``P * coef``
    (gamma in training, the eval map's slope otherwise) is added to G's first ``C_l`` columns.

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


def _finalize(g: Tensor, x: Tensor, d_out: Tensor, stats, noise: Tensor | None) -> Tensor:
    """``Ops.finalize`` in PyTorch: a segment's input gradient from its column range of G (accumulation
    dtype), of the buffer and of the output gradient. ``stats``: ``(mean, rstd, sum_g, sum_gx)`` per
    channel in training, None in eval (frozen statistics: each norm1 is an affine map, already in G).
    ``noise``: the layer's dropout multiplier, applied last (dropout backward)."""
    d_out = d_out.to(g.dtype)
    if stats is None:
        d_x = g + d_out
    else:
        mean, rstd, sum_g, sum_gx = stats
        m = g.shape[0]
        d_x = (x.to(g.dtype) - mean).mul_(rstd)  # xhat
        d_x.mul_(sum_gx / m).neg_().add_(g).sub_(sum_g / m).mul_(rstd).add_(d_out)
    return d_x.mul_(noise) if noise is not None else d_x


def block_backward(
    grad_out: Tensor,
    out: Tensor,
    params: tuple[Tensor, ...],
    state: BlockState,
    needs_input_grad: tuple[bool, ...],
    *,
    growth_rate: int,
    training: bool,
    compute_dtype: torch.dtype,
    ops: Ops | None,
    sync: StatsSync | None = None,
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Gradients of the input and of every parameter, per DESIGN.md section 4. ``ops``: the forward's
    (None: the torch backend's); ``sync``: the forward's SyncBatchNorm group, if any."""
    n, c_total, *spatial = out.shape
    grid = (n, *spatial)
    k, num_layers = growth_rate, len(params) // PARAMS_PER_LAYER
    c0, m = c_total - num_layers * k, math.prod(grid)
    rows = as_rows(out)
    acc, cdt = accumulation_dtype(out.dtype), compute_dtype
    grad_sum = torch.zeros((m, c_total), dtype=acc, device=out.device)  # G: sum over consumers
    sync = sync if training else None
    count = m if sync is None else sync.total(m, out.device)
    if training:
        # Per channel: sum_rows(G) and sum_rows(G * xhat), accumulated from each layer's dbeta, dgamma.
        sum_g = torch.zeros(c_total, dtype=acc, device=out.device)
        sum_gx = torch.zeros(c_total, dtype=acc, device=out.device)

    norm1_backward = (ops.norm1_backward if ops else None) or _norm1_backward
    finalize_segment = (ops.finalize if ops else None) or _finalize

    def finalize(lo: int, hi: int, noise: Tensor | None = None) -> Tensor:
        """Gradient of columns [lo, hi) once every consumer has been accumulated into G."""
        stats = None
        if training:
            sums = (sum_g[lo:hi], sum_gx[lo:hi])
            if sync is not None:  # over every process's rows; finalize divides by this process's m
                sums = tuple(t.mul_(m / count) for t in sync.sum(*sums))
            stats = (state.seg_mean[lo:hi], state.seg_rstd[lo:hi], *sums)
        return finalize_segment(grad_sum[:, lo:hi], rows[:, lo:hi], as_rows(grad_out[:, lo:hi]), stats, noise)

    grads: list[Tensor | None] = [None] * len(params)
    for layer in reversed(range(num_layers)):
        g1, b1, w1, g2, b2, w2 = _layer_params(params, layer)
        saved, c_in = state.layers[layer], c0 + layer * k
        need = needs_input_grad[1 + layer * PARAMS_PER_LAYER : 1 + (layer + 1) * PARAMS_PER_LAYER]
        w1c = w1.to(cdt).view(-1, c_in)
        mean1, rstd1 = (state.seg_mean[:c_in], state.seg_rstd[:c_in]) if training else (saved.mean1, saved.rstd1)
        norm1 = affine(g1, b1, mean1, rstd1, training=training)
        norm2 = affine(g2, b2, saved.mean2, saved.rstd2, training=training)

        with stage("finalize", out.device):
            d_new = finalize(c_in, c_in + k, saved.dropout_noise)  # every consumer of this layer's output is done
        bottleneck = saved.bottleneck
        if bottleneck is None:
            with stage("gemm", out.device):
                bottleneck = _bottleneck(rows[:, :c_in], norm1, w1c.t())
        d_bottleneck, d_g2, d_b2, d_w2 = _conv2_norm2_backward(
            d_new, bottleneck, norm2, saved.rstd2, w2.to(cdt), grid, training, need[5], sync, count
        )
        del d_new, bottleneck
        coef = g1.to(acc) if training else norm1.scale  # eval: norm1 is an affine map of slope scale
        with stage("gemm_backward", out.device):
            d_g1, d_b1, d_w1 = norm1_backward(
                d_bottleneck, rows[:, :c_in], norm1, rstd1, w1c, grad_sum, coef, need_weight=need[2]
            )
        del d_bottleneck
        if training:
            sum_g[:c_in].addcmul_(coef, d_b1)
            sum_gx[:c_in].addcmul_(coef, d_g1)

        layer_grads = (d_g1, d_b1, d_w1, d_g2, d_b2, d_w2)
        for offset, (grad, param) in enumerate(zip(layer_grads, (g1, b1, w1, g2, b2, w2), strict=True)):
            if need[offset]:
                grads[layer * PARAMS_PER_LAYER + offset] = grad.view_as(param).to(param.dtype)

    d_x = None
    if needs_input_grad[0]:
        d_x = as_images(finalize(0, c0), *grid).to(out.dtype)
    return d_x, grads
