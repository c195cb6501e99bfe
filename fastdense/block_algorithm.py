"""A dense block's algorithm, shared by both backends: docs/design.md sections 2 and 4.

One channels_last buffer per block holds every feature map; seen as a row-major ``M x C_total``
matrix (``M = N*H*W``), layer ``l`` reads the column prefix ``[0, C_l)`` and writes its ``k`` new
columns in place. Training-mode batch statistics of a column are computed once, when it is written,
and shared by every BatchNorm that reads it. The backward recomputes the normalised activations from
the buffer and sums every consumer's BatchNorm gradient into one gradient buffer ``G``, finalising each
segment once (the derivation is in docs/design.md section 4).

This module holds the loops over layers, the saved state and the forward/backward contract; the
operations inside them come as an ``Ops`` record: plain PyTorch in ``torch_ops``, Triton kernels in
``triton_ops``. The buffer keeps the input's dtype (as ``torch.cat`` would); statistics and gradient
sums run in the accumulation dtype (float64 for float64 inputs, float32 otherwise).

What runs between the operations is kept to whole blocks, not layers: the convolution weights are cast to
the compute dtype by one multi-tensor copy per block (``conv_weights``); the batch statistics live in two
arrays per block (each channel's mean, variance and rstd; each bottleneck's), which the operations write
and read in place; BatchNorm maps are passed as stored (``batchnorm.NormMap``), for the operations to form
their vectors (the kernels in registers); gradients that need a cast to their parameter's dtype get one
multi-tensor copy per block. The running statistics are updated after the forward by a few multi-tensor
operators per block (``update_block_running_stats``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .batchnorm import MEAN, RSTD, VAR, NormMap, accumulation_dtype, update_many_running_stats
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
    buffer layout and the same statistics arrays, so one loop and one saved state serve both.

    Statistics are written into ``(3, c)`` views of a block's arrays, rows ``MEAN``, ``RSTD`` (``1 / sqrt(var +
    eps)``, with ``stats_eps``) and ``VAR`` (biased; with ``variance_from_rstd`` only the mean and rstd, the
    algorithm forms every variance of the block at its end). ``pool``: the block's arrival counters
    (``kernels.last_program.CounterPool``, from ``counters``; None for the torch backend). A BatchNorm map
    is a ``NormMap``, or what ``fold_maps`` made of it where the ops have one.

    column_stats(cols, stats, eps, pool): the statistics of an ``M x c`` buffer slice.
    bottleneck(x, norm1, w1, stats, stats_eps, epilogue, pool) -> Y: ``relu(norm1(x)) @ w1^T`` for an
        ``M x C_l`` buffer prefix (``w1``: ``4k x C_l``, compute dtype; ``norm1`` a ``NormMap``); ``stats``: Y's
        column statistics (training); ``epilogue``: an eval-mode norm2 map applied with relu2 to Y.
    new_features(Y, norm2, w2, grid, out, noise, stats, stats_eps, pool): writes
        ``conv3x3(relu(norm2(Y))) * noise`` into the ``M x k`` buffer slice ``out`` (``norm2`` None: Y is
        already activated; ``noise`` None: no dropout) and the slice's statistics into ``stats``; ``grid`` is
        ``(N, *spatial)``.
    new_features_backward(d_new, Y, norm2, w2, grid, training, need_weight, sync, count, pool) ->
        (dY, d_gamma2, d_beta2, d_w2): the backward of ``new_features`` from the new features' gradient
        (dropout undone) to the bottleneck's (``torch_ops.conv3x3_norm2_backward``); ``dY`` is whatever the
        same ops' ``norm1_backward`` takes (the triton backend's: norm2's output gradient with the vectors
        that form ``dY`` from it, ``triton_ops.Norm2Grad``).
    norm1_backward(dY, x, norm1, w1, G, sums, need_weight, from_w1_grad, first, pool, divisor) -> (d_gamma1,
        d_beta1, d_w1): the backward of ``bottleneck``, adding ``coef * P`` into G's first ``C_l`` columns and
        ``coef * d_beta1``, ``coef * d_gamma1`` into the rows of ``sums`` (a ``(2, C_l)`` view of the block's
        sums of G and G * xhat; None when not needed), ``coef`` being gamma with batch statistics and the
        map's slope with running ones (``torch_ops.norm1_backward``); ``from_w1_grad``: whether
        ``norm1_weight_grad_divisors`` gave the layer a divisor (then ``divisor``); ``first`` (only with
        ``norm1_writes_first``): the block's last layer, which writes those columns of G.
    finalize(g, x, d_out, stats, noise, dtype) -> dx: a segment's input gradient in ``dtype``
        (``torch_ops.finalize``); ``stats``: ``(mean, rstd, sum_g, sum_gx)`` in training, the sums None
        unless ``finalize_takes_sums`` (or SyncBatchNorm's, which must be global).
    norm2_relu_training(Y, weight, bias, eps) -> (relu(norm2(Y)), mean, rstd): training mode's norm2
        statistics and activation at once (``torch_ops.norm2_relu_training``); then ``bottleneck`` is asked for
        no statistics, ``new_features`` gets the activation, norm2 None, and the algorithm stores the block's
        norm2 statistics at its end.
    fold_maps(maps) -> list: the BatchNorm maps of a whole block (eval's, and the backward's) prepared in a
        few operators (``batchnorm.fold_many``), for operations that apply a folded map.
    norm1_weight_grad_divisors(weights, biases, compute_dtype) -> list: per layer of a block, None, or where
        its norm1 backward may take ``sum(P * xhat)`` from conv1's weight gradient the divisor that takes
        (``torch_ops.norm1_weight_grad_divisors``).
    counters(phase, m, c0, growth, width, layers, need_weights, device) -> CounterPool or None: the zeroed
        arrival counters a block's forward (``phase="forward"``) or backward takes its launches' from.
    fuses_eval_norm2: whether ``bottleneck`` applies an ``epilogue``.
    grad_in_buffer_dtype: whether G is in the buffer's dtype (else in the accumulation dtype).
    norm1_writes_first: whether the last layer's ``norm1_backward`` writes G's prefix (``first``), so that G
        starts uninitialised instead of as zeros (its last ``k`` columns are never read).
    multi_tensor: whether the block's whole-block steps may use PyTorch's multi-tensor operators (the weights'
        cast); not in what ``torch.export`` traces, which the exporters lower (``torch_ops.EXPORT_OPS``).
    pairs_layers(compute_dtype) -> bool: whether the backward takes layers in pairs (None: never):
        ``norm1_backward(..., columns=(lo, hi))`` for the
        upper layer covers only the buffer columns ``[lo, hi)`` (the lower layer's new features, then
        finalised), runs the layer's weight gradient, and returns an extra value that the lower layer's
        ``norm1_backward(..., upper=...)`` takes: its launch adds both layers' contributions to the prefix
        ``[0, lo)``, G's prefix and the buffer's read and written once for the two.
    """

    column_stats: Callable
    bottleneck: Callable
    new_features: Callable
    new_features_backward: Callable
    norm1_backward: Callable
    finalize: Callable
    norm1_weight_grad_divisors: Callable | None = None
    norm2_relu_training: Callable | None = None
    counters: Callable | None = None
    fold_maps: Callable | None = None
    fuses_eval_norm2: bool = False
    grad_in_buffer_dtype: bool = False
    norm1_writes_first: bool = False
    variance_from_rstd: bool = False
    finalize_takes_sums: bool = True
    multi_tensor: bool = True
    pairs_layers: Callable | None = None


@dataclass
class LayerState:
    """Per-layer tensors the backward reads (everything else is recomputed from the buffer)."""

    bottleneck: Tensor | None = None  # M x 4k, only when keep_bottlenecks
    dropout_noise: Tensor | None = None  # M x k, mask / (1 - p), only with dropout in training


@dataclass
class BlockState:
    """What a block forward leaves for its backward: per layer ``LayerState``, the compute-dtype copy of the
    convolution weights (``weights``: one flat tensor, when the forward cast them), and in training the
    batch statistics over ``count`` rows (every process's, with SyncBatchNorm): ``all_stats``, one
    ``(3, C_total + L * 4k)`` array (rows ``MEAN``, ``RSTD``, ``VAR``) whose views are ``stats``, of every
    channel of the buffer (shared by every norm1), and ``norm2``, ``(3, L, 4k)``, of each bottleneck. The
    statistics are an output of the block operator, which the autograd formula saves beside ``flatten()``'s
    tensors."""

    layers: list[LayerState] = field(default_factory=list)
    weights: Tensor | None = None
    all_stats: Tensor | None = None
    count: int = 0
    c_total: int = 0
    width: int = 0  # the bottleneck's channels, 4k

    @property
    def stats(self) -> Tensor | None:
        return None if self.all_stats is None else split_statistics(self.all_stats, self.c_total, self.width)[0]

    @property
    def norm2(self) -> Tensor | None:
        return None if self.all_stats is None else split_statistics(self.all_stats, self.c_total, self.width)[1]

    # The state goes through ctx.save_for_backward (not ctx attributes), so that autograd frees it
    # after backward like any saved tensor instead of keeping it as long as the graph is referenced.
    def flatten(self) -> list[Tensor | None]:
        per_layer = [getattr(s, f.name) for s in self.layers for f in fields(s)]  # astuple would deep-copy
        return [self.weights, *per_layer]

    @classmethod
    def unflatten(cls, tensors: list[Tensor | None], all_stats: Tensor | None, c_total: int, width: int) -> BlockState:
        n = len(fields(LayerState))
        layers = [LayerState(*tensors[i : i + n]) for i in range(1, len(tensors), n)]
        return cls(layers, tensors[0], all_stats, c_total=c_total, width=width)


def split_statistics(all_stats: Tensor, c_total: int, width: int) -> tuple[Tensor, Tensor]:
    """A block's statistics array as ``(stats, norm2)``: ``(3, C_total)`` and ``(3, L, width)`` views."""
    return all_stats[:, :c_total], all_stats[:, c_total:].unflatten(1, (-1, width))


def batch_stats_of(state: BlockState, global_count: bool) -> BatchStats:
    """A training forward's ``BatchStats``; the count as a tensor only for SyncBatchNorm (``global_count``:
    every process's rows), zero-size otherwise (the caller knows its batch's rows: no launch)."""
    if global_count:
        count = state.all_stats.new_full((), state.count, dtype=torch.float64)
    else:
        count = state.all_stats.new_empty(0, dtype=torch.float64)
    return BatchStats(state.stats, state.norm2, count)


class BatchStats(NamedTuple):
    """A training forward's batch statistics, in the accumulation dtype: ``stats`` of the buffer's channels
    (``(3, C_total)``, rows ``MEAN``, ``RSTD``, ``VAR`` (biased); every norm1 reads a prefix of them),
    ``norm2`` of each layer's bottleneck (``(3, L, 4k)``), both views of one array, and the number of rows
    they are over (a 0-dim float64 tensor with SyncBatchNorm: every process's rows; zero-size otherwise,
    where the caller knows its batch's)."""

    stats: Tensor
    norm2: Tensor
    count: Tensor

    @property
    def var(self) -> Tensor:
        return self.stats[VAR]

    @property
    def mean(self) -> Tensor:
        return self.stats[MEAN]


def update_block_running_stats(norms1, norms2, stats: BatchStats, count: int | Tensor, growth_rate: int) -> None:
    """The running-statistics updates of every BatchNorm of a block after a training forward (outside the
    forward itself, so that the forward is a pure function of its inputs for ``torch.compile``): a few
    multi-tensor operators for the whole block (``update_many_running_stats``)."""
    c0 = stats.stats.shape[1] - len(norms1) * growth_rate
    prefixes = [c0 + layer * growth_rate for layer in range(len(norms1))]
    means = [stats.mean[:c_in] for c_in in prefixes] + list(stats.norm2[MEAN].unbind(0))
    variances = [stats.var[:c_in] for c_in in prefixes] + list(stats.norm2[VAR].unbind(0))
    update_many_running_stats([*norms1, *norms2], means, variances, count)


def _layer_params(params: tuple[Tensor, ...], layer: int) -> tuple[Tensor, ...]:
    return params[layer * PARAMS_PER_LAYER : (layer + 1) * PARAMS_PER_LAYER]


def conv_weights(params: tuple[Tensor, ...], dtype: torch.dtype, flat: Tensor | None = None, multi_tensor=True):
    """Every layer's ``(conv1.weight, conv2.weight)`` in the compute dtype ``dtype`` and contiguous (as the
    kernels read them), as a list of pairs, and the flat tensor that holds them when they were cast or copied
    (else None: the parameters themselves). The cast is one multi-tensor copy for the whole block (one launch
    on a GPU) into views of one new tensor; ``flat``: that tensor, kept by the forward (its views are taken
    again, nothing is copied). Weights in channels_last memory (``model.to(memory_format=...)``) are copied
    as they are cast. ``multi_tensor=False``: one copy per weight instead (what exporters lower)."""
    weights = [w for layer in range(len(params) // PARAMS_PER_LAYER) for w in _layer_params(params, layer)[2::3]]
    if not weights or (flat is None and all(w.dtype == dtype and w.is_contiguous() for w in weights)):
        return list(zip(weights[0::2], weights[1::2], strict=True)), None
    if flat is None:
        flat = torch.empty(sum(w.numel() for w in weights), dtype=dtype, device=weights[0].device)
        views = [part.view(w.shape) for part, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)]
        if multi_tensor:
            torch._foreach_copy_(views, weights)
        else:
            for view, w in zip(views, weights, strict=True):
                view.copy_(w)
    else:
        views = [part.view(w.shape) for part, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)]
    return list(zip(views[0::2], views[1::2], strict=True)), flat


def variance_from_rstd(stats: Tensor, eps: float) -> None:
    """Fill the ``VAR`` row of a statistics array from its ``RSTD`` row: ``var = rstd^-2 - eps``, as PyTorch's
    SyncBatchNorm recovers it (for the ops that give ``rstd``)."""
    torch.pow(stats[RSTD], -2, out=stats[VAR]).sub_(eps).clamp_min_(0.0)


def _synced(stats: Tensor, sync: StatsSync | None, rows: int, eps: float, ops: Ops) -> None:
    """SyncBatchNorm: a ``(3, c)`` statistics view made global (every process's rows), in place."""
    if sync is None:
        return
    if ops.variance_from_rstd:
        variance_from_rstd(stats, eps)
    var, mean = sync.stats((stats[VAR], stats[MEAN]), rows)
    stats[MEAN].copy_(mean)
    stats[VAR].copy_(var)
    torch.add(var, eps, out=stats[RSTD]).rsqrt_()


def _counters(ops: Ops, phase: str, *sizes):
    return ops.counters(phase, *sizes) if ops.counters is not None else None


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
    c_total, m, width = c0 + num_layers * k, math.prod(grid), params[2].shape[0]
    acc, cdt, ops = accumulation_dtype(x.dtype), plan.compute_dtype, plan.ops
    sync = plan.sync if plan.training else None

    if buffer is None:
        buf = torch.empty((*grid, c_total), dtype=x.dtype, device=x.device)
        buf[..., :c0].copy_(x.movedim(1, -1))
    else:
        buf = buffer
    rows = buf.view(m, c_total)
    weights, flat = conv_weights(params, cdt, multi_tensor=ops.multi_tensor)
    state = BlockState(weights=flat if save else None)
    pool = _counters(ops, "forward", m, c0, k, width, num_layers, False, x.device)
    eps2 = [float(norm.eps) for norm in plan.norms2]
    if plan.training:
        state.all_stats = torch.empty((3, c_total + num_layers * width), dtype=acc, device=x.device)
        state.c_total, state.width = c_total, width
        stats, norm2_stats = state.stats, state.norm2
        state.count = m if sync is None else sync.total(m, x.device)
        with stage("stats", x.device):
            ops.column_stats(rows[:, :c0], stats[:, :c0], plan.eps1, pool)
            _synced(stats[:, :c0], sync, m, plan.eps1, ops)

    # Eval mode folds norm2 and relu2 into the GEMM's epilogue when the raw bottleneck is not kept. Training
    # takes norm2's statistics and its activation from one BatchNorm call where the ops have one (statistics
    # over this process's rows only, of a non-empty batch).
    fuse_norm2 = ops.fuses_eval_norm2 and not plan.training and not (save and plan.keep_bottlenecks)
    fuse_train_norm2 = plan.training and ops.norm2_relu_training is not None and sync is None and m > 0
    kept_layers = kept_bottleneck_layers(num_layers, c_total, width, device_type(x), len(spatial))
    eval_maps = [] if plan.training else _block_maps(params, plan.norms1, plan.norms2, ops)
    norm2_parts = []  # (mean, rstd) per layer from norm2_relu_training, stored at the end
    for layer in range(num_layers):
        g1, b1, _, g2, b2, _ = _layer_params(params, layer)
        w1, w2 = weights[layer]
        c_in = c0 + layer * k
        if plan.training:
            norm1 = NormMap(stats[MEAN, :c_in], stats[RSTD, :c_in], g1, b1)
            stats2 = norm2_stats[:, layer]
        else:
            norm1, norm2 = eval_maps[layer]
        with stage("gemm", x.device):
            bottleneck = ops.bottleneck(
                rows[:, :c_in], norm1, w1.view(-1, c_in), stats2 if plan.training and not fuse_train_norm2 else None,
                eps2[layer], norm2 if fuse_norm2 else None, pool,
            )  # M x 4k  # fmt: skip
        activated = None  # relu(norm2(bottleneck)), when its statistics came with it
        if fuse_train_norm2:
            with stage("conv", x.device):
                activated, *mean_rstd = ops.norm2_relu_training(bottleneck, g2, b2, eps2[layer])
            norm2_parts.append(mean_rstd)
        elif plan.training:
            _synced(stats2, sync, m, eps2[layer], ops)
        if plan.training:
            norm2 = NormMap(stats2[MEAN], stats2[RSTD], g2, b2)

        noise = None
        p = plan.drop_rates[layer]
        if plan.training and p > 0:
            channelwise = bool(plan.channelwise_dropout) and plan.channelwise_dropout[layer]
            noise = dropout_noise(grid, k, p, channelwise, cdt, x.device)
        with stage("conv", x.device):
            ops.new_features(
                bottleneck if activated is None else activated,
                None if fuse_norm2 or activated is not None else norm2,
                w2,
                grid,
                rows[:, c_in : c_in + k],
                noise,
                stats[:, c_in : c_in + k] if plan.training else None,
                plan.eps1,
                pool,
            )
            del activated
        if plan.training:
            _synced(stats[:, c_in : c_in + k], sync, m, plan.eps1, ops)
        if save:
            kept = plan.keep_bottlenecks and layer in kept_layers
            state.layers.append(LayerState(bottleneck if kept else None, noise))
        del bottleneck
    if plan.training:
        _finish_statistics(state, norm2_parts, plan.eps1, eps2, ops)
    return buf.movedim(-1, 1), state


def _finish_statistics(state: BlockState, norm2_parts: list, eps1: float, eps2: list, ops: Ops):
    """A training forward's statistics completed for the whole block at once: norm2's means and rstds from
    ``norm2_relu_training`` stored (one operator each), and, with ``variance_from_rstd``, every variance
    (three operators, when every norm2 shares norm1's eps)."""
    stats, norm2_stats = state.stats, state.norm2
    if norm2_parts:
        torch.stack([mean for mean, _ in norm2_parts], out=norm2_stats[MEAN])
        torch.stack([rstd for _, rstd in norm2_parts], out=norm2_stats[RSTD])
    if not ops.variance_from_rstd:
        return
    if set(eps2) <= {eps1}:
        variance_from_rstd(state.all_stats, eps1)
        return
    variance_from_rstd(stats, eps1)
    for layer, eps in enumerate(eps2):
        variance_from_rstd(norm2_stats[:, layer], eps)


def _block_maps(params, norms1, norms2, ops: Ops, stats: Tensor | None = None, norm2_stats: Tensor | None = None):
    """Per layer, norm1's and norm2's maps: of the batch statistics (``stats``, ``norm2_stats``: training's
    backward), else of each module's running statistics; prepared for the whole block by ``ops.fold_maps``."""
    maps = []
    for layer in range(len(params) // PARAMS_PER_LAYER):
        g1, b1, w1, g2, b2, _ = _layer_params(params, layer)
        if stats is not None:
            c_in = w1.shape[1]
            maps += [NormMap(stats[MEAN, :c_in], stats[RSTD, :c_in], g1, b1),
                     NormMap(norm2_stats[MEAN, layer], norm2_stats[RSTD, layer], g2, b2)]  # fmt: skip
        else:
            maps += [NormMap.running(norms1[layer], g1, b1), NormMap.running(norms2[layer], g2, b2)]
    if ops.fold_maps is not None:
        maps = ops.fold_maps(maps)
    return list(zip(maps[0::2], maps[1::2], strict=True))


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


def _cast_grads(grads: list[Tensor | None], params: tuple[Tensor, ...]) -> list[Tensor | None]:
    """Every gradient in its parameter's dtype and shape: those in another dtype (a half-precision weight
    gradient) by one multi-tensor copy for the block."""
    pending = [i for i, g in enumerate(grads) if g is not None and g.dtype != params[i].dtype]
    if pending:
        cast = [torch.empty(params[i].shape, dtype=params[i].dtype, device=params[i].device) for i in pending]
        torch._foreach_copy_(cast, [grads[i].view(params[i].shape) for i in pending])
        for i, g in zip(pending, cast, strict=True):
            grads[i] = g
    return [g if g is None else g.view(p.shape) for g, p in zip(grads, params, strict=True)]


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
    running: list | None = None,
    sync: StatsSync | None = None,
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Gradients of the input and of every parameter, per docs/design.md section 4. ``ops``: the forward's;
    ``running`` (eval mode): each layer's norm1 and norm2 as ``RunningNorm``s (the statistics the forward
    normalised with); ``sync``: the forward's SyncBatchNorm group, if any."""
    n, c_total, *spatial = out.shape
    grid = (n, *spatial)
    k, num_layers = growth_rate, len(params) // PARAMS_PER_LAYER
    c0, m = c_total - num_layers * k, math.prod(grid)
    rows = as_rows(out)
    acc, cdt = accumulation_dtype(out.dtype), compute_dtype
    g_dtype = out.dtype if ops.grad_in_buffer_dtype else acc
    weights, _ = conv_weights(params, cdt, state.weights)
    width = params[2].shape[0]
    # G: sum over consumers. With norm1_writes_first the last layer's norm1 backward, the first to reach G,
    # writes all of it but the last layer's own columns, which nothing reads (below): no zeros needed.
    writes_first = ops.norm1_writes_first and num_layers > 0
    grad_sum = (torch.empty if writes_first else torch.zeros)((m, c_total), dtype=g_dtype, device=out.device)
    sync = sync if training else None
    count = m if sync is None else sync.total(m, out.device)
    # Per channel: sum_rows(G) and sum_rows(G * xhat), accumulated from each layer's dbeta, dgamma (for
    # finalize, where it takes them; global ones with SyncBatchNorm).
    needs_sums = training and (ops.finalize_takes_sums or sync is not None)
    sums = torch.zeros((2, c_total), dtype=acc, device=out.device) if needs_sums else None
    needs_w1 = any(needs_input_grad[1 + layer * PARAMS_PER_LAYER + 2] for layer in range(num_layers))
    pool = _counters(ops, "backward", m, c0, k, width, num_layers, needs_w1, out.device)

    def finalize(lo: int, hi: int, dtype: torch.dtype, noise: Tensor | None = None) -> Tensor:
        """Gradient of columns [lo, hi) once every consumer has been accumulated into G."""
        stats = None
        if training:
            segment = (None, None) if sums is None else (sums[0, lo:hi], sums[1, lo:hi])
            if sync is not None:  # over every process's rows; finalize divides by this process's m
                segment = tuple(t.mul_(m / count) for t in sync.sum(*segment))
            stats = (state.stats[MEAN, lo:hi], state.stats[RSTD, lo:hi], *segment)
        return ops.finalize(grad_sum[:, lo:hi], rows[:, lo:hi], as_rows(grad_out[:, lo:hi]), stats, noise, dtype)

    grads: list[Tensor | None] = [None] * len(params)
    divisors = [None] * num_layers  # per layer: norm1's sum(P * xhat) from conv1's weight gradient, divided by
    if ops.norm1_weight_grad_divisors is not None:  # every norm1's weight, and every norm1's bias
        norms1 = list(params[0::PARAMS_PER_LAYER]), list(params[1::PARAMS_PER_LAYER])
        with stage("gemm_backward", out.device):
            divisors = ops.norm1_weight_grad_divisors(*norms1, cdt)
    running = running or [None] * (2 * num_layers)
    maps = _block_maps(params, running[0::2], running[1::2], ops, state.stats, state.norm2)

    def needs(layer: int) -> tuple[bool, ...]:
        return needs_input_grad[1 + layer * PARAMS_PER_LAYER : 1 + (layer + 1) * PARAMS_PER_LAYER]

    def to_bottleneck(layer: int):
        """The layer's new features' gradient (its consumers all done), back through the 3x3 conv and norm2:
        ``(d_bottleneck, d_g2, d_b2, d_w2)``."""
        saved, c_in = state.layers[layer], c0 + layer * k
        with stage("finalize", out.device):
            if layer == num_layers - 1:  # no consumer: G and its sums are zero there, the gradient is the output's
                d_new = _last_layer_grad(grad_out[:, c_in:], saved.dropout_noise, cdt)
            else:  # every consumer of this layer's output is done
                d_new = finalize(c_in, c_in + k, cdt, saved.dropout_noise)
        bottleneck = saved.bottleneck
        if bottleneck is None:
            with stage("gemm", out.device):
                bottleneck = ops.bottleneck(rows[:, :c_in], maps[layer][0], weights[layer][0].view(-1, c_in), None,
                                            0.0, None, pool)  # fmt: skip
        return ops.new_features_backward(d_new, bottleneck, maps[layer][1], weights[layer][1], grid, training,
                                         needs(layer)[5], sync, count, pool)  # fmt: skip

    def keep(layer: int, layer_grads) -> None:
        for offset, grad in enumerate(layer_grads):
            if needs(layer)[offset]:
                grads[layer * PARAMS_PER_LAYER + offset] = grad

    def norm1_backward(layer: int, d_bottleneck, first: bool, **pairing):
        c_in = c0 + layer * k
        with stage("gemm_backward", out.device):
            return ops.norm1_backward(
                d_bottleneck, rows[:, :c_in], maps[layer][0], weights[layer][0].view(-1, c_in), grad_sum,
                None if sums is None else sums[:, :c_in], needs(layer)[2], divisors[layer] is not None,
                writes_first and first, pool, divisors[layer], **pairing,
            )  # fmt: skip

    # Layers in pairs where the ops pair them (``Ops.pairs_layers``): the upper layer's 1x1 backward first
    # covers only the lower layer's new columns (what the lower's own backward needs finalised), then one
    # launch adds both layers' contributions to the prefix they share: G's prefix and the buffer's read and
    # written once for two layers.
    # (not where bottlenecks are recomputed: a pair's launch would hold the lower's recomputed bottleneck beside
    # the upper's dY, one bottleneck-sized tensor more than a layer alone, against memory_efficient's purpose)
    kept = all(saved.bottleneck is not None for saved in state.layers)
    pairs = ops.pairs_layers is not None and ops.pairs_layers(cdt) and kept
    layer = num_layers - 1
    while layer >= 0:
        d_bottleneck, *norm2_grads = to_bottleneck(layer)
        top = layer == num_layers - 1  # the first to reach G (with norm1_writes_first: writes it)
        if not pairs or layer == 0:
            keep(layer, (*norm1_backward(layer, d_bottleneck, top), *norm2_grads))
            del d_bottleneck  # (bottleneck-sized: not held while the next layer's are made)
            layer -= 1
            continue
        lower_columns = (c0 + (layer - 1) * k, c0 + layer * k)
        *upper_grads, upper = norm1_backward(layer, d_bottleneck, top, columns=lower_columns)
        keep(layer, (*upper_grads, *norm2_grads))
        del d_bottleneck
        d_bottleneck, *norm2_grads = to_bottleneck(layer - 1)
        keep(layer - 1, (*norm1_backward(layer - 1, d_bottleneck, top, upper=upper), *norm2_grads))
        del upper, d_bottleneck
        layer -= 2

    d_x = None
    if needs_input_grad[0]:
        d_x = as_images(finalize(0, c0, out.dtype), *grid)
    return d_x, _cast_grads(grads, params)
