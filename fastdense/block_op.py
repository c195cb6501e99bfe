"""A dense block as two PyTorch custom operators, ``fastdense::dense_block`` and its backward.

The block writes every layer into one buffer in place, which neither autograd nor ``torch.compile``
can trace through. As registered operators (``torch.library``) with shape-only "fake" implementations
and an autograd formula, the block is one opaque node to both: ``torch.compile(fullgraph=True)`` sees
no graph break, and Inductor compiles the rest of the model around it.

The forward is a pure function of its inputs: it returns the block's batch statistics, and the
module updates the running statistics afterwards (``block_algorithm.update_block_running_stats``). The
tensors the backward needs come back as the statistics and a list of extra outputs (``BlockState.flatten``,
a zero-size tensor standing for each absent one) that the autograd formula saves, with, in eval mode, the
running statistics the forward normalised with (inputs: autograd's version check guards them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import flops
from .batchnorm import accumulation_dtype
from .block_algorithm import (
    PARAMS_PER_LAYER,
    BatchStats,
    BlockPlan,
    BlockState,
    Ops,
    RunningNorm,
    batch_stats_of,
    block_backward,
    block_forward,
    kept_bottleneck_layers,
    split_statistics,
)
from .devices import device_type
from .sync_batchnorm import StatsSync
from .torch_ops import TORCH_OPS
from .triton_ops import triton_ops
from .validation import autocast_off


def backend_ops(backend: str, spatial_dims: int) -> Ops:
    """The operations a resolved backend ("torch" or "triton") runs inside the block's loops."""
    return triton_ops(spatial_dims) if backend == "triton" else TORCH_OPS


def _present(t: Tensor) -> Tensor | None:
    # Every saved tensor a forward really keeps has elements (channel vectors are never empty; an empty
    # batch's bottleneck or noise recomputes to the same nothing), so a zero-size one means "absent".
    return t if t.numel() else None


def _without_aliases(tensors: list[Tensor], others: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` with a copy in place of any that shares memory with ``others`` or an earlier one:
    an operator's outputs may alias neither its inputs nor each other (the vectors are tiny). Fake and meta
    tensors (shape-only, as the counting tools run the operator) have no memory to share."""
    if tensors and (is_fake(tensors[0]) or tensors[0].is_meta):  # (one op's outputs: all fake or none)
        return tensors
    seen = {t.untyped_storage().data_ptr() for t in others if t.numel()}
    result = []
    for t in tensors:
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        result.append(t)
    return result


@torch.library.custom_op("fastdense::dense_block", mutates_args=())
def dense_block(
    x: Tensor,
    params: list[Tensor],
    running: list[Tensor],
    eps: list[float],
    drop_rates: list[float],
    channelwise_dropout: list[bool],
    growth_rate: int,
    training: bool,
    keep_bottlenecks: bool,
    compute_dtype: torch.dtype,
    backend: str,
    save: bool,
    sync_group: str,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """The block forward: ``(out, stats, count, saved)``; a training forward's batch statistics (one
    ``(3, C_total + L * 4k)`` array, ``block_algorithm.split_statistics``; zero-size in eval) and, with
    SyncBatchNorm, the rows they are over (else zero-size), ``saved`` what the backward reads (empty unless
    ``save``); ``sync_group``: the process group of SyncBatchNorm statistics, "" for none.

    ``params``: six per layer (``block_algorithm.PARAMS_PER_LAYER``); ``running``: norm1's then norm2's
    running mean and variance per layer; ``eps``: norm1's and norm2's per layer (in training every norm1
    uses the first: the batch statistics are shared)."""
    norms = _running_norms(running, eps)
    plan = BlockPlan(
        norms1=norms[0::2],
        norms2=norms[1::2],
        drop_rates=list(drop_rates),
        growth_rate=growth_rate,
        training=training,
        keep_bottlenecks=keep_bottlenecks,
        compute_dtype=compute_dtype,
        eps1=eps[0],
        ops=backend_ops(backend, x.dim() - 2),
        channelwise_dropout=tuple(channelwise_dropout),
        sync=StatsSync(sync_group) if sync_group else None,
    )
    with autocast_off(x.device.type):
        out, state = block_forward(x, tuple(params), plan, save=save)
    stats = state.all_stats if training else state_vector(x)
    count = batch_stats_of(state, bool(sync_group)).count if training else state_vector(x, torch.float64)
    saved = [state_vector(x) if t is None else t for t in state.flatten()] if save else []
    stats, count, *saved = _without_aliases([stats, count, *saved], [x, out, *params, *running])
    return out, stats, count, saved


def _running_norms(running: list[Tensor], eps: list[float]) -> list[RunningNorm]:
    """norm1, norm2, norm1, ... of the layers as ``RunningNorm``s (running mean and variance, eps)."""
    return [RunningNorm(running[2 * i], running[2 * i + 1], eps[i]) for i in range(len(eps))]


def state_vector(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A zero-size tensor (in the accumulation dtype of ``x``): stands for an absent output."""
    return x.new_empty(0, dtype=dtype or accumulation_dtype(x.dtype))


def _casts_weights(params, compute_dtype: torch.dtype) -> bool:
    """Whether the forward casts or copies the convolution weights (``block_algorithm.conv_weights``)."""
    weights = [*params[2::PARAMS_PER_LAYER], *params[5::PARAMS_PER_LAYER]]
    return any(w.dtype != compute_dtype or not w.is_contiguous() for w in weights)


@dense_block.register_fake
def _dense_block_fake(
    x, params, running, eps, drop_rates, channelwise_dropout, growth_rate, training, keep_bottlenecks,
    compute_dtype, backend, save, sync_group,
):  # fmt: skip
    """Shapes and dtypes only, as ``dense_block`` produces them."""
    n, c0, *spatial = x.shape
    num_layers, width = len(drop_rates), params[2].shape[0]
    c_total, m, acc = c0 + num_layers * growth_rate, n * math.prod(spatial), accumulation_dtype(x.dtype)

    def vector(*shape, dtype=acc, present=True):
        return x.new_empty(shape, dtype=dtype) if present else state_vector(x)

    out = x.new_empty((n, *spatial, c_total)).movedim(-1, 1)
    stats = vector(3, c_total + num_layers * width, present=training)
    count = x.new_empty((), dtype=torch.float64) if training and sync_group else x.new_empty(0, dtype=torch.float64)
    saved = []
    if save:
        weights = sum(w.numel() for w in [*params[2::PARAMS_PER_LAYER], *params[5::PARAMS_PER_LAYER]])
        saved = [vector(weights, dtype=compute_dtype, present=_casts_weights(params, compute_dtype))]
        kept = kept_bottleneck_layers(num_layers, c_total, width, device_type(x), len(spatial))
        for layer, p in enumerate(drop_rates):
            saved.append(vector(m, width, dtype=compute_dtype, present=keep_bottlenecks and layer in kept))
            saved.append(vector(m, growth_rate, dtype=compute_dtype, present=training and p > 0))
    return out, stats, count, saved


@torch.library.custom_op("fastdense::dense_block_backward", mutates_args=())
def dense_block_backward(
    grad_out: Tensor,
    out: Tensor,
    params: list[Tensor],
    running: list[Tensor],
    stats: Tensor,
    saved: list[Tensor],
    eps: list[float],
    growth_rate: int,
    training: bool,
    compute_dtype: torch.dtype,
    backend: str,
    sync_group: str,
    needs_input_grad: list[bool],
) -> tuple[Tensor, list[Tensor]]:
    """The input's and the parameters' gradients (zero-size where ``needs_input_grad`` says none:
    ``[input, *params]``). ``running``: in eval mode the forward's running statistics (as ``dense_block``
    takes them), empty in training; ``stats``: the forward's batch statistics (training)."""
    width = params[2].shape[0] if params else 0
    state = BlockState.unflatten([_present(t) for t in saved], _present(stats), out.shape[1], width)
    with autocast_off(out.device.type):
        d_x, grads = block_backward(
            grad_out, out, tuple(params), state, tuple(needs_input_grad),
            growth_rate=growth_rate, training=training, compute_dtype=compute_dtype,
            ops=backend_ops(backend, out.dim() - 2), running=_running_norms(running, eps) if running else None,
            sync=StatsSync(sync_group) if sync_group else None,
        )  # fmt: skip
    d_x = out.new_empty(0) if d_x is None else d_x
    grads = [p.new_empty(0) if g is None else g.contiguous() for g, p in zip(grads, params, strict=True)]
    d_x, *grads = _without_aliases([d_x, *grads], [grad_out, out, *params, *saved])  # kernels' sums share memory
    return d_x, grads


@dense_block_backward.register_fake
def _dense_block_backward_fake(
    grad_out, out, params, running, stats, saved, eps, growth_rate, training, compute_dtype, backend,
    sync_group, needs_input_grad,
):  # fmt: skip
    n, c_total, *spatial = out.shape
    c0 = c_total - len(params) // PARAMS_PER_LAYER * growth_rate
    d_x = out.new_empty((n, *spatial, c0)).movedim(-1, 1) if needs_input_grad[0] else out.new_empty(0)
    grads = [
        p.new_empty(p.shape) if need else p.new_empty(0) for p, need in zip(params, needs_input_grad[1:], strict=True)
    ]
    return d_x, grads


def _setup_context(ctx, inputs, output) -> None:
    _x, params, running, eps, *_, growth_rate, training, _keep, compute_dtype, backend, _save, sync_group = inputs
    out, stats, count, saved = output
    ctx.mark_non_differentiable(stats, count, *saved)
    ctx.set_materialize_grads(False)  # else backward gets a zero tensor the size of every saved bottleneck
    kept_running = [] if training else list(running)  # eval: the statistics the forward normalised with
    ctx.save_for_backward(out, stats, *params, *kept_running, *saved)
    ctx.num_params, ctx.num_kept_running, ctx.num_running = len(params), len(kept_running), len(running)
    ctx.num_settings = len(inputs) - 3
    ctx.eps = list(eps)
    ctx.settings = (growth_rate, training, compute_dtype, backend, sync_group)


def _backward(ctx, grad_out, *_unused):
    out, stats, *rest = ctx.saved_tensors
    if grad_out is None:  # the output took no part in the loss (only the statistics outputs did)
        grad_out = torch.zeros_like(out)
    params = rest[: ctx.num_params]
    running = rest[ctx.num_params : ctx.num_params + ctx.num_kept_running]
    saved = rest[ctx.num_params + ctx.num_kept_running :]
    needs_x, needs_params, *_ = ctx.needs_input_grad
    needs = [bool(needs_x), *map(bool, needs_params)]
    with torch.no_grad():
        d_x, grads = dense_block_backward(grad_out, out, params, running, stats, saved, ctx.eps, *ctx.settings, needs)
    wanted = [g if need else None for g, need in zip([d_x, *grads], needs, strict=True)]
    if torch.is_grad_enabled() and grad_out.requires_grad:  # create_graph=True: as once_differentiable does
        wanted = _fail_if_differentiated(wanted)
    return wanted[0], wanted[1:], [None] * ctx.num_running, *[None] * ctx.num_settings


def _fail_if_differentiated(grads: list[Tensor | None]) -> list[Tensor | None]:
    """The gradients, made to raise if a second backward goes through them (the backward is
    hand-written, not itself differentiable), as ``torch.autograd.function.once_differentiable`` does."""
    present = [g.detach().requires_grad_() for g in grads if g is not None]
    if not present:
        return grads
    flagged = iter(
        torch._C._functions.DelayedError(
            "trying to differentiate twice fastdense's dense block backward", len(present)
        )(*present)
    )
    return [None if g is None else next(flagged) for g in grads]


dense_block.register_autograd(_backward, setup_context=_setup_context)

# The operators' own implementations by overload: the counting tools run these under their dispatch modes
# (fake tensors), so that what a block allocates and launches inside is seen, not just its outputs.
OPENED = {op._opoverload: op._init_fn for op in (dense_block, dense_block_backward)}


def run_dense_block(
    block, x: Tensor, *, backend: str, compute_dtype: torch.dtype, save: bool, sync_group: str = ""
) -> tuple[Tensor, BatchStats | None]:
    """Call the operator for a ``FastDenseBlock``: gather its parameters, running statistics and settings."""
    layers = list(block.values())
    params = list(block.layer_params())
    norms = [norm for layer in layers for norm in (layer.norm1, layer.norm2)]
    running = [t for norm in norms for t in (norm.running_mean, norm.running_var)]
    out, stats, count, _saved = dense_block(
        x,
        params,
        running,
        [float(norm.eps) for norm in norms],
        [float(layer.drop_rate) for layer in layers],
        [layer.channelwise_dropout for layer in layers],
        block.growth_rate,
        block.training,
        not block.memory_efficient,
        compute_dtype,
        backend,
        save,
        sync_group,
    )
    if not block.training:
        return out, None
    return out, BatchStats(*split_statistics(stats, out.shape[1], params[2].shape[0]), count)


# FlopCounterMode sees each operator as one call: the formulas count the convolutions inside.
flops.register(torch.ops.fastdense.dense_block, torch.ops.fastdense.dense_block_backward)
