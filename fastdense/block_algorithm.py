"""A dense block's algorithm, shared by both backends: DESIGN.md sections 2 and 4.

One channels_last buffer per block holds every feature map; seen as a row-major ``M x C_total``
matrix (``M = N*H*W``), layer ``l`` reads the column prefix ``[0, C_l)`` and writes its ``k`` new
columns in place. Training-mode batch statistics of a column are computed once, when it is written,
and shared by every BatchNorm that reads it. The backward recomputes the normalised activations from
the buffer and sums every consumer's BatchNorm gradient into one gradient buffer ``G``, finalising each
segment once (the derivation is in DESIGN.md section 4).

This module holds the loops over layers, the saved state and the forward/backward contract; the
operations inside them come as an ``Ops`` record: plain PyTorch in ``torch_ops``, Triton kernels in
``triton_ops``. The buffer keeps the input's dtype (as ``torch.cat`` would); statistics and gradient
sums run in the accumulation dtype (float64 for float64 inputs, float32 otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .batchnorm import accumulation_dtype, affine, running_stats, update_many_running_stats
from .devices import device_type
from .layout import as_images, as_rows
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
    keep_bottlenecks: bool  # memory_efficient=False keeps 1x1 conv outputs for backward (kept_bottleneck_layers)
    compute_dtype: torch.dtype
    eps1: float  # shared by every norm1 of the block (checked by the module)
    ops: Ops  # the operations inside the loop: torch_ops.TORCH_OPS or triton_ops.triton_ops(...)
    # Per layer: dropout zeroes whole channels of a sample (MONAI's Dropout2d/3d) instead of single values.
    channelwise_dropout: tuple[bool, ...] = ()
    sync: StatsSync | None = None  # SyncBatchNorm: batch statistics over the processes of a group


@dataclass(frozen=True)
class Ops:
    """The operations of a dense block's forward and backward. The torch backend's are plain PyTorch ops
    (``torch_ops``); the triton backend's fuse them into kernels (``triton_ops``). Both keep the same
    buffer layout and return the same statistics, so one loop and one saved state serve both.

    column_stats(cols) -> (var, mean): biased batch statistics of an ``M x c`` buffer slice.
    bottleneck(x, norm1, w1, stats, epilogue) -> (Y, (var, mean) or None): ``relu(norm1(x)) @ w1^T`` for
        an ``M x C_l`` buffer prefix (``w1``: ``4k x C_l``, compute dtype); ``stats``: Y's column
        statistics (training); ``epilogue``: an eval-mode norm2 map applied with relu2 to Y.
    new_features(Y, norm2, w2, grid, out, noise, stats) -> (var, mean) or None: writes
        ``conv3x3(relu(norm2(Y))) * noise`` into the ``M x k`` buffer slice ``out`` (``norm2`` None: Y is
        already activated; ``noise`` None: no dropout) and returns the slice's statistics with ``stats``;
        ``grid`` is ``(N, *spatial)``.
    new_features_backward(d_new, Y, norm2, rstd2, w2, grid, training, need_weight, sync, count) ->
        (dY, d_gamma2, d_beta2, d_w2): the backward of ``new_features`` from the new features' gradient
        (dropout undone) to the bottleneck's (``torch_ops.conv3x3_norm2_backward``).
    norm1_backward(dY, x, norm1, rstd1, w1, G, coef, need_weight, from_w1_grad, first) -> (d_gamma1, d_beta1,
        d_w1): the backward of ``bottleneck``, adding ``coef * P`` into G's first ``C_l`` columns
        (``torch_ops.norm1_backward``); ``from_w1_grad``: as ``norm1_weight_grad_serves`` said of the layer;
        ``first`` (only with ``norm1_writes_first``): the block's last layer, which writes those columns.
    finalize(g, x, d_out, stats, noise) -> dx: a segment's input gradient (``torch_ops.finalize``).
    norm2_relu_training(Y, weight, bias, eps) -> (relu(norm2(Y)), (var, mean), rstd) or None: training
        mode's norm2 statistics and activation at once (``torch_ops.norm2_relu_training``); then
        ``bottleneck`` is asked for no statistics and ``new_features`` gets the activation, norm2 None.
    norm1_weight_grad_serves(weights, biases, compute_dtype) -> list[bool] or None: per layer of a block,
        whether its norm1 backward may take ``sum(P * xhat)`` from conv1's weight gradient
        (``torch_ops.norm1_weight_grad_serves``); None: never.
    fuses_eval_norm2: whether ``bottleneck`` applies an ``epilogue``.
    folds_norms: whether any operation applies a BatchNorm's folded map (``Affine.shift``).
    grad_in_buffer_dtype: whether G is in the buffer's dtype (else in the accumulation dtype).
    norm1_writes_first: whether the last layer's ``norm1_backward`` writes G's prefix (``first``), so that G
        starts uninitialised instead of as zeros (its last ``k`` columns are never read).
    """

    column_stats: Callable
    bottleneck: Callable
    new_features: Callable
    new_features_backward: Callable
    norm1_backward: Callable
    finalize: Callable
    norm1_weight_grad_serves: Callable | None = None
    norm2_relu_training: Callable | None = None
    fuses_eval_norm2: bool = False
    folds_norms: bool = True
    grad_in_buffer_dtype: bool = False
    norm1_writes_first: bool = False


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
    prefixes = [c0 + layer * growth_rate for layer in range(len(norms1))]
    means = [stats.mean[:c_in] for c_in in prefixes] + list(stats.mean2.unbind(0))
    variances = [stats.var[:c_in] for c_in in prefixes] + list(stats.var2.unbind(0))
    update_many_running_stats([*norms1, *norms2], means, variances, count)


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
    acc, cdt, ops = accumulation_dtype(x.dtype), plan.compute_dtype, plan.ops
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
            torch.add(var, plan.eps1, out=state.seg_rstd[lo:hi]).rsqrt_()

        with stage("stats", x.device):
            record_segment_stats(0, c0, synced(ops.column_stats(rows[:, :c0])))

    # Eval mode folds norm2 and relu2 into the GEMM's epilogue when the raw bottleneck is not kept. Training
    # takes norm2's statistics and its activation from one BatchNorm call where the ops have one (statistics
    # over this process's rows only, of a non-empty batch).
    fuse_norm2 = ops.fuses_eval_norm2 and not plan.training and not (save and plan.keep_bottlenecks)
    fuse_train_norm2 = plan.training and ops.norm2_relu_training is not None and sync is None and m > 0
    kept_layers = kept_bottleneck_layers(num_layers, c_total, params[2].shape[0], device_type(x), len(spatial))
    for layer in range(num_layers):
        g1, b1, w1, g2, b2, w2 = _layer_params(params, layer)
        norm1, norm2, c_in = plan.norms1[layer], plan.norms2[layer], c0 + layer * k
        if plan.training:
            mean1, rstd1 = state.seg_mean[:c_in], state.seg_rstd[:c_in]
        else:
            mean1, rstd1 = running_stats(norm1, acc)
        norm1_map = affine(g1, b1, mean1, rstd1, fold=ops.folds_norms)
        if not plan.training:
            mean2, rstd2 = running_stats(norm2, acc)
        eval_norm2 = affine(g2, b2, mean2, rstd2, fold=ops.folds_norms) if fuse_norm2 else None
        with stage("gemm", x.device):
            bottleneck, stats2 = ops.bottleneck(
                rows[:, :c_in], norm1_map, w1.to(cdt).view(-1, c_in), plan.training and not fuse_train_norm2, eval_norm2
            )  # M x 4k

        activated = None  # relu(norm2(bottleneck)), when its statistics came with it
        if fuse_train_norm2:
            with stage("conv", x.device):
                activated, (var2, mean2), rstd2 = ops.norm2_relu_training(bottleneck, g2, b2, norm2.eps)
            state.norm2_stats.append((var2, mean2))
        elif plan.training:
            var2, mean2 = (s.to(acc) for s in synced(stats2))
            state.norm2_stats.append((var2, mean2))
            rstd2 = torch.rsqrt(var2 + norm2.eps)
        norm2_map = None if fuse_norm2 or activated is not None else affine(g2, b2, mean2, rstd2, fold=ops.folds_norms)

        noise = None
        p = plan.drop_rates[layer]
        if plan.training and p > 0:
            channelwise = bool(plan.channelwise_dropout) and plan.channelwise_dropout[layer]
            noise = dropout_noise(grid, k, p, channelwise, cdt, x.device)
        with stage("conv", x.device):
            stats_new = ops.new_features(
                bottleneck if activated is None else activated,
                norm2_map,
                w2.to(cdt),
                grid,
                rows[:, c_in : c_in + k],
                noise,
                plan.training,
            )
            del activated
        if plan.training:
            record_segment_stats(c_in, c_in + k, synced(stats_new))
        if save:
            kept = bottleneck if plan.keep_bottlenecks and layer in kept_layers else None
            running1 = (None, None) if plan.training else (mean1, rstd1)
            state.layers.append(LayerState(*running1, mean2, rstd2, kept, noise))
        del bottleneck
    return buf.movedim(-1, 1), state


def kept_bottleneck_layers(num_layers: int, c_total: int, width: int, device: str, spatial_dims: int) -> range:
    """With ``memory_efficient=False``, the layers whose bottleneck (``width`` = 4k channels) the forward
    keeps for the backward: every layer, except in a 3-D block on the CPU (``device``), where memory is
    what stops volumes and keeping them all buys a few percent: there the last ones, as many as fit in the
    size of the block's buffer (``c_total`` channels), whose recomputation from the widest prefixes would
    cost the most."""
    if device != "cpu" or spatial_dims < 3:
        return range(num_layers)
    return range(max(0, num_layers - max(1, c_total // max(width, 1))), num_layers)


def dropout_noise(grid, k: int, p: float, channelwise: bool, dtype, device) -> Tensor:
    """The ``M x k`` dropout multiplier of a layer's new features: 0 with probability ``p``, else
    ``1 / (1 - p)``, the distribution of ``F.dropout``; ``channelwise``: one draw per sample and channel,
    shared by all its positions, as ``F.dropout2d`` / ``F.dropout3d`` draw."""
    n, *spatial = grid
    draws = (n, *[1] * len(spatial), k) if channelwise else (*grid, k)
    noise = torch.empty(draws, dtype=dtype, device=device).bernoulli_(1.0 - p)
    noise.mul_(0.0 if p == 1.0 else 1.0 / (1.0 - p))
    return noise.expand(*grid, k).reshape(-1, k)


def _last_layer_grad(grad_out: Tensor, noise: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The gradient of the block's last layer's new features (``N x k x ...``), which no layer reads:
    the block output's, through the dropout multiplier ``noise``; as ``M x k`` rows in ``dtype``."""
    rows = as_rows(grad_out)
    return (rows * noise).to(dtype) if noise is not None else rows.to(dtype).contiguous()


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
    ops: Ops,
    sync: StatsSync | None = None,
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Gradients of the input and of every parameter, per DESIGN.md section 4. ``ops``: the forward's;
    ``sync``: the forward's SyncBatchNorm group, if any."""
    n, c_total, *spatial = out.shape
    grid = (n, *spatial)
    k, num_layers = growth_rate, len(params) // PARAMS_PER_LAYER
    c0, m = c_total - num_layers * k, math.prod(grid)
    rows = as_rows(out)
    acc, cdt = accumulation_dtype(out.dtype), compute_dtype
    g_dtype = out.dtype if ops.grad_in_buffer_dtype else acc
    # G: sum over consumers. With norm1_writes_first the last layer's norm1 backward, the first to reach G,
    # writes all of it but the last layer's own columns, which nothing reads (below): no zeros needed.
    writes_first = ops.norm1_writes_first and num_layers > 0
    grad_sum = (torch.empty if writes_first else torch.zeros)((m, c_total), dtype=g_dtype, device=out.device)
    sync = sync if training else None
    count = m if sync is None else sync.total(m, out.device)
    if training:
        # Per channel: sum_rows(G) and sum_rows(G * xhat), accumulated from each layer's dbeta, dgamma.
        sum_g = torch.zeros(c_total, dtype=acc, device=out.device)
        sum_gx = torch.zeros(c_total, dtype=acc, device=out.device)

    def finalize(lo: int, hi: int, noise: Tensor | None = None) -> Tensor:
        """Gradient of columns [lo, hi) once every consumer has been accumulated into G."""
        stats = None
        if training:
            sums = (sum_g[lo:hi], sum_gx[lo:hi])
            if sync is not None:  # over every process's rows; finalize divides by this process's m
                sums = tuple(t.mul_(m / count) for t in sync.sum(*sums))
            stats = (state.seg_mean[lo:hi], state.seg_rstd[lo:hi], *sums)
        return ops.finalize(grad_sum[:, lo:hi], rows[:, lo:hi], as_rows(grad_out[:, lo:hi]), stats, noise)

    grads: list[Tensor | None] = [None] * len(params)
    from_w1_grad = [False] * num_layers
    if ops.norm1_weight_grad_serves is not None:  # every norm1's weight, and every norm1's bias
        norms1 = list(params[0::PARAMS_PER_LAYER]), list(params[1::PARAMS_PER_LAYER])
        from_w1_grad = ops.norm1_weight_grad_serves(*norms1, cdt)
    for layer in reversed(range(num_layers)):
        g1, b1, w1, g2, b2, w2 = _layer_params(params, layer)
        saved, c_in = state.layers[layer], c0 + layer * k
        need = needs_input_grad[1 + layer * PARAMS_PER_LAYER : 1 + (layer + 1) * PARAMS_PER_LAYER]
        w1c = w1.to(cdt).view(-1, c_in)
        mean1, rstd1 = (state.seg_mean[:c_in], state.seg_rstd[:c_in]) if training else (saved.mean1, saved.rstd1)
        norm1 = affine(g1, b1, mean1, rstd1, fold=ops.folds_norms)
        norm2 = affine(g2, b2, saved.mean2, saved.rstd2, fold=ops.folds_norms)

        with stage("finalize", out.device):
            if layer == num_layers - 1:  # no consumer: G and its sums are zero there, the gradient is the output's
                d_new = _last_layer_grad(grad_out[:, c_in:], saved.dropout_noise, g_dtype)
            else:  # every consumer of this layer's output is done
                d_new = finalize(c_in, c_in + k, saved.dropout_noise)
        bottleneck = saved.bottleneck
        if bottleneck is None:
            with stage("gemm", out.device):
                bottleneck, _ = ops.bottleneck(rows[:, :c_in], norm1, w1c, False, None)
        d_bottleneck, d_g2, d_b2, d_w2 = ops.new_features_backward(
            d_new, bottleneck, norm2, saved.rstd2, w2.to(cdt), grid, training, need[5], sync, count
        )
        del d_new, bottleneck
        coef = g1.to(acc) if training else norm1.scale  # eval: norm1 is an affine map of slope scale
        with stage("gemm_backward", out.device):
            d_g1, d_b1, d_w1 = ops.norm1_backward(
                d_bottleneck,
                rows[:, :c_in],
                norm1,
                rstd1,
                w1c,
                grad_sum,
                coef,
                need[2],
                from_w1_grad[layer],
                writes_first and layer == num_layers - 1,
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
