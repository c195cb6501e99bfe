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

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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

# Per-layer parameters in the order they are passed to the autograd Function.
PARAMS_PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight


@dataclass
class BlockPlan:
    """What a block forward needs besides the tensors: modules for running statistics, settings."""

    norms1: list[nn.BatchNorm2d]
    norms2: list[nn.BatchNorm2d]
    drop_rates: list[float]
    growth_rate: int
    training: bool
    keep_bottlenecks: bool  # memory_efficient=False keeps each layer's 1x1 conv output for backward
    compute_dtype: torch.dtype
    eps1: float  # shared by every norm1 of the block (checked by the module)
    ops: Ops | None = None  # the forward's kernels: None means TORCH_OPS; fastdense.triton_backend has the others
    buffer_stats: tuple[Tensor, Tensor] | None = None  # set by the forward in training: the buffer's (var, mean)


@dataclass(frozen=True)
class Ops:
    """The three forward kernels of a dense block. The torch backend's are plain PyTorch ops; the
    Triton backend's fuse them (``fastdense.triton_backend``). Both keep the same buffer layout and
    return the same statistics, so one backward serves both.

    column_stats(cols) -> (var, mean): biased batch statistics of an ``M x c`` buffer slice.
    bottleneck(x, norm1, w1, stats, epilogue) -> (Y, (var, mean) or None): ``relu(norm1(x)) @ w1^T`` for
        an ``M x C_l`` buffer prefix (``w1``: ``4k x C_l``, compute dtype); ``stats``: Y's column
        statistics (training); ``epilogue``: an eval-mode norm2 map applied with relu2 to Y.
    new_features(Y, norm2, w2, nhw, out, noise, stats) -> (var, mean) or None: writes
        ``conv3x3(relu(norm2(Y))) * noise`` into the ``M x k`` buffer slice ``out`` (``norm2`` None: Y is
        already activated; ``noise`` None: no dropout) and returns the slice's statistics with ``stats``.
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

    mean1: Tensor  # the statistics norm1 used: batch (views of the shared vectors) or running
    rstd1: Tensor
    mean2: Tensor
    rstd2: Tensor
    bottleneck: Tensor | None = None  # M x 4k, only when keep_bottlenecks
    dropout_noise: Tensor | None = None  # M x k, mask / (1 - p), only with dropout in training


@dataclass
class BlockState:
    layers: list[LayerState] = field(default_factory=list)
    seg_mean: Tensor | None = None  # training: per-channel batch mean of the whole buffer
    seg_rstd: Tensor | None = None  # training: per-channel 1 / sqrt(var + eps1)
    seg_var: Tensor | None = None  # training: per-channel biased variance (shared with the next BatchNorm, not saved)

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


def as_images(rows: Tensor, n: int, h: int, w: int) -> Tensor:
    """An ``M x C`` matrix (any row stride: a buffer's column slice too) seen as an ``(N, C, H, W)``
    channels_last tensor, without a copy."""
    return rows.unflatten(0, (n, h, w)).permute(0, 3, 1, 2)


def as_rows(t: Tensor) -> Tensor:
    """An ``(N, C, H, W)`` tensor as an ``M x C`` matrix with adjacent columns, as the kernels take it:
    a view when it is channels_last (or a channel slice of such), else a copy."""
    n, c, h, w = t.shape
    rows = t.permute(0, 2, 3, 1).reshape(n * h * w, c)
    return rows if c <= 1 or rows.stride(1) == 1 else rows.contiguous()


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


def conv3x3_into(bottleneck, norm2: Affine | None, w2, nhw, out, noise, stats: bool, column_stats=_column_stats):
    """``Ops.new_features`` with a 3x3 convolution from PyTorch (cuDNN on CUDA): the activation is
    materialised, convolved, multiplied by the dropout noise and copied into the buffer slice."""
    n, h, w = nhw
    act2 = bottleneck if norm2 is None else norm2(bottleneck).relu_()
    new = F.conv2d(as_images(act2.to(w2.dtype), n, h, w), w2, padding=1)  # (N, k, H, W)
    del act2
    if noise is not None:
        new = new * as_images(noise, n, h, w)
    as_images(out, n, h, w).copy_(new)
    del new
    return column_stats(out) if stats else None


TORCH_OPS = Ops(column_stats=_column_stats, bottleneck=_torch_bottleneck, new_features=conv3x3_into)


def _layer_params(params: tuple[Tensor, ...], layer: int) -> tuple[Tensor, ...]:
    return params[layer * PARAMS_PER_LAYER : (layer + 1) * PARAMS_PER_LAYER]


def block_forward(
    x: Tensor, params: tuple[Tensor, ...], plan: BlockPlan, save: bool, buffer: Tensor | None = None
) -> tuple[Tensor, BlockState]:
    """Run the block; return the ``(N, C_total, H, W)`` channels_last buffer and the saved state.

    ``buffer``: an ``(N, H, W, C_total)`` tensor whose first ``C0`` channels already hold ``x`` (written
    there by the previous op), used as the block's buffer instead of a new one and a copy."""
    n, c0, h, w = x.shape
    k, num_layers = plan.growth_rate, len(plan.norms1)
    c_total, m = c0 + num_layers * k, n * h * w
    acc, cdt, ops = accumulation_dtype(x.dtype), plan.compute_dtype, plan.ops or TORCH_OPS

    if buffer is None:
        buf = torch.empty((n, h, w, c_total), dtype=x.dtype, device=x.device)
        buf[..., :c0].copy_(x.permute(0, 2, 3, 1))
    else:
        buf = buffer
    rows = buf.view(m, c_total)
    state = BlockState()
    if plan.training:
        state.seg_mean = torch.empty(c_total, dtype=acc, device=x.device)
        state.seg_rstd = torch.empty(c_total, dtype=acc, device=x.device)
        seg_var = state.seg_var = torch.empty(c_total, dtype=acc, device=x.device)
        plan.buffer_stats = (seg_var, state.seg_mean)

        def record_segment_stats(lo: int, hi: int, stats: tuple[Tensor, Tensor]) -> None:
            var, mean = stats
            state.seg_mean[lo:hi], seg_var[lo:hi] = mean, var
            state.seg_rstd[lo:hi] = torch.rsqrt(var.to(acc) + plan.eps1)

        with stage("stats", x.device):
            record_segment_stats(0, c0, ops.column_stats(rows[:, :c0]))

    # Eval mode folds norm2 and relu2 into the GEMM's epilogue when the raw bottleneck is not kept.
    fuse_norm2 = ops.fuses_eval_norm2 and not plan.training and not (save and plan.keep_bottlenecks)
    for layer in range(num_layers):
        g1, b1, w1, g2, b2, w2 = _layer_params(params, layer)
        norm1, norm2, c_in = plan.norms1[layer], plan.norms2[layer], c0 + layer * k
        if plan.training:
            mean1, rstd1 = state.seg_mean[:c_in], state.seg_rstd[:c_in]
            update_running_stats(norm1, mean1, seg_var[:c_in], m)
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
            var2, mean2 = (s.to(acc) for s in stats2)
            update_running_stats(norm2, mean2, var2, m)
            rstd2 = torch.rsqrt(var2 + norm2.eps)
        norm2_map = None if fuse_norm2 else affine(g2, b2, mean2, rstd2, training=plan.training)

        noise = None
        p = plan.drop_rates[layer]
        if plan.training and p > 0:
            # Same distribution as F.dropout: keep with probability 1 - p, scale kept values by 1/(1-p).
            noise = torch.empty((m, k), dtype=cdt, device=x.device).bernoulli_(1.0 - p)
            noise.mul_(0.0 if p == 1.0 else 1.0 / (1.0 - p))
        with stage("conv", x.device):
            stats_new = ops.new_features(
                bottleneck, norm2_map, w2.to(cdt), (n, h, w), rows[:, c_in : c_in + k], noise, plan.training
            )
        if plan.training:
            record_segment_stats(c_in, c_in + k, stats_new)
        if save:
            kept = bottleneck if plan.keep_bottlenecks else None
            state.layers.append(LayerState(mean1, rstd1, mean2, rstd2, kept, noise))
        del bottleneck
    return buf.permute(0, 3, 1, 2), state


def _conv2_norm2_backward(d_new, bottleneck, norm2: Affine, rstd2, w2c, nhw, training: bool, need_weight: bool):
    """From the gradient of a layer's new features (dropout already undone) back to its bottleneck:
    3x3 conv, ReLU and norm2 backward, with norm2-ReLU recomputed exactly as the forward did.

    Returns the bottleneck gradient (compute dtype) and the gradients of norm2's weight and bias and of
    conv2's weight (None when not needed)."""
    n, h, w = nhw
    acc, cdt, m = rstd2.dtype, w2c.dtype, bottleneck.shape[0]
    pre2 = norm2(bottleneck)
    mask2 = pre2 > 0
    act2 = pre2.relu_().to(cdt)
    del pre2
    with stage("conv_backward", bottleneck.device):
        d_act2, d_w2, _ = torch.ops.aten.convolution_backward(
            as_images(d_new.to(cdt), n, h, w), as_images(act2, n, h, w), w2c, None,
            [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, need_weight, False],
        )  # fmt: skip
    del act2
    with stage("norm_backward", bottleneck.device):
        d_pre2 = as_rows(d_act2).to(acc).mul_(mask2)  # through relu2
        del d_act2, mask2
        yhat = (bottleneck.to(acc) - norm2.mean).mul_(rstd2)
        d_b2 = d_pre2.sum(0)
        d_g2 = (d_pre2 * yhat).sum(0)
        d_bottleneck = input_grad_from_sums(d_pre2, yhat, d_b2, d_g2, norm2.scale, m, training).to(cdt)
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
    plan: BlockPlan,
    state: BlockState,
    needs_input_grad: tuple[bool, ...],
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Gradients of the input and of every parameter, per DESIGN.md section 4."""
    n, c_total, h, w = out.shape
    k, num_layers = plan.growth_rate, len(plan.norms1)
    c0, m = c_total - num_layers * k, n * h * w
    rows = as_rows(out)
    acc, cdt = accumulation_dtype(out.dtype), plan.compute_dtype
    grad_sum = torch.zeros((m, c_total), dtype=acc, device=out.device)  # G: sum over consumers
    if plan.training:
        # Per channel: sum_rows(G) and sum_rows(G * xhat), accumulated from each layer's dbeta, dgamma.
        sum_g = torch.zeros(c_total, dtype=acc, device=out.device)
        sum_gx = torch.zeros(c_total, dtype=acc, device=out.device)

    norm1_backward = (plan.ops.norm1_backward if plan.ops else None) or _norm1_backward
    finalize_segment = (plan.ops.finalize if plan.ops else None) or _finalize

    def finalize(lo: int, hi: int, noise: Tensor | None = None) -> Tensor:
        """Gradient of columns [lo, hi) once every consumer has been accumulated into G."""
        stats = (state.seg_mean[lo:hi], state.seg_rstd[lo:hi], sum_g[lo:hi], sum_gx[lo:hi]) if plan.training else None
        return finalize_segment(grad_sum[:, lo:hi], rows[:, lo:hi], as_rows(grad_out[:, lo:hi]), stats, noise)

    grads: list[Tensor | None] = [None] * len(params)
    for layer in reversed(range(num_layers)):
        g1, b1, w1, g2, b2, w2 = _layer_params(params, layer)
        saved, c_in = state.layers[layer], c0 + layer * k
        need = needs_input_grad[1 + layer * PARAMS_PER_LAYER : 1 + (layer + 1) * PARAMS_PER_LAYER]
        w1c = w1.to(cdt).view(-1, c_in)
        norm1 = affine(g1, b1, saved.mean1, saved.rstd1, training=plan.training)
        norm2 = affine(g2, b2, saved.mean2, saved.rstd2, training=plan.training)

        with stage("finalize", out.device):
            d_new = finalize(c_in, c_in + k, saved.dropout_noise)  # every consumer of this layer's output is done
        bottleneck = saved.bottleneck
        if bottleneck is None:
            with stage("gemm", out.device):
                bottleneck = _bottleneck(rows[:, :c_in], norm1, w1c.t())
        d_bottleneck, d_g2, d_b2, d_w2 = _conv2_norm2_backward(
            d_new, bottleneck, norm2, saved.rstd2, w2.to(cdt), (n, h, w), plan.training, need_weight=need[5]
        )
        del d_new, bottleneck
        coef = g1.to(acc) if plan.training else norm1.scale  # eval: norm1 is an affine map of slope scale
        with stage("gemm_backward", out.device):
            d_g1, d_b1, d_w1 = norm1_backward(
                d_bottleneck, rows[:, :c_in], norm1, saved.rstd1, w1c, grad_sum, coef, need_weight=need[2]
            )
        del d_bottleneck
        if plan.training:
            sum_g[:c_in].addcmul_(coef, d_b1)
            sum_gx[:c_in].addcmul_(coef, d_g1)

        layer_grads = (d_g1, d_b1, d_w1, d_g2, d_b2, d_w2)
        for offset, (grad, param) in enumerate(zip(layer_grads, (g1, b1, w1, g2, b2, w2), strict=True)):
            if need[offset]:
                grads[layer * PARAMS_PER_LAYER + offset] = grad.view_as(param).to(param.dtype)

    d_x = None
    if needs_input_grad[0]:
        d_x = as_images(finalize(0, c0), n, h, w).to(out.dtype)
    return d_x, grads


class DenseBlockFunction(torch.autograd.Function):
    """A whole dense block as one autograd node, so layers can write into the shared buffer in place."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: BlockPlan, *params: Tensor) -> Tensor:
        out, state = block_forward(x, params, plan, save=True)
        ctx.plan, ctx.num_params = plan, len(params)
        ctx.save_for_backward(out, *params, *state.flatten())
        return out

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable: say so, loudly
    def backward(ctx, grad_out: Tensor):
        out, *rest = ctx.saved_tensors
        params, state = tuple(rest[: ctx.num_params]), BlockState.unflatten(rest[ctx.num_params :])
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])
        with torch.autocast(out.device.type, enabled=False):
            d_x, grads = block_backward(grad_out, out, params, ctx.plan, state, needs)
        return (d_x, None, *grads)
