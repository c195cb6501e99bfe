"""BatchNorm pieces shared by the block algorithm, the torch ops and the stem, transitions and head.

Everything here reproduces ``nn.BatchNorm2d`` in training and eval mode from explicitly given
statistics, so that one set of batch statistics can serve several consumers and the backward can
recompute the normalised activations instead of storing them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

# The rows of a statistics array (a dense block's; one kernel launch's): per channel the batch mean,
# ``1 / sqrt(var + eps)`` and the biased variance.
MEAN, RSTD, VAR = 0, 1, 2


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: itself when it already is (a no-op ``.to()`` still costs a microsecond of host
    time, and a block's maps ask hundreds of times a step)."""
    return t if t.dtype == dtype else t.to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and gradient sums run in float64 for float64 data, in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_stats(x: Tensor, dim: int | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Biased variance and mean over ``dim``, in the accumulation dtype.

    Corrected two-pass algorithm: subtract a first estimate of the mean, then take the mean and the
    mean square of the residual; the square of the residual's mean corrects the variance for the
    first estimate's rounding. As robust as Welford's method and several times faster than
    ``torch.var_mean`` on the CPU. An empty batch gets zeros: nothing is normalised and the running
    statistics are left alone.
    """
    acc = accumulation_dtype(x.dtype)
    if x.numel() == 0:
        shape = [s for d, s in enumerate(x.shape) if d not in ((dim,) if isinstance(dim, int) else dim)]
        return torch.zeros(2, *shape, dtype=acc, device=x.device).unbind(0)
    mean = x.mean(dim, keepdim=True, dtype=acc)
    residual = x - mean
    correction = residual.mean(dim, keepdim=True)
    var = residual.square_().mean(dim, keepdim=True).sub_(correction.square())
    return var.flatten(), mean.add_(correction).flatten()


def native_training_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, running=(None, None), momentum=0.0):
    """``(norm(x), mean, rstd)`` of a training BatchNorm from one ``torch.native_batch_norm`` call: batch
    statistics and the normalised output in two passes over ``x``, the vectors (and the statistics) in the
    accumulation dtype; ``running``: ``(running_mean, running_var)`` to update with ``momentum`` as
    ``nn.BatchNorm2d`` does (the same operator), or none."""
    acc = accumulation_dtype(x.dtype)
    weight, bias = as_dtype(weight, acc), as_dtype(bias, acc)
    out, mean, rstd = torch.native_batch_norm(x, weight, bias, *running, True, momentum, eps)
    if is_fake(mean) and mean.dtype != acc:
        # The counters' fake tensors take x's dtype for the statistics, where the device's kernel returns
        # them in the accumulation dtype: the same result, without counting a conversion no device runs.
        return out, torch.empty_like(mean, dtype=acc), torch.empty_like(rstd, dtype=acc)
    return out, mean.to(acc), rstd.to(acc)


def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int | Tensor) -> None:
    """The running-statistics update of ``nn.BatchNorm2d`` in training mode, from given batch stats:
    momentum (or the cumulative average for ``momentum=None``), unbiased variance, num_batches_tracked.
    ``count``: the rows the statistics are over (a tensor when it comes from other processes too)."""
    update_many_running_stats([bn], [mean], [var], count)


def update_many_running_stats(bns: list, means: list[Tensor], variances: list[Tensor], count: int | Tensor) -> None:
    """``update_running_stats`` for several BatchNorms whose statistics are over the same rows (a dense
    block's): a handful of multi-tensor operators for all of them (one launch each on a GPU) when they
    share a momentum and their buffers have the statistics' dtype, else the same formula module by module."""
    torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    if isinstance(count, int) and count == 0:  # an empty batch leaves the running statistics alone, as PyTorch
        return
    unbiased = torch._foreach_mul(variances, count / (count - 1))  # callers refuse count == 1 in training
    momenta = {bn.momentum for bn in bns}
    pairs = zip(bns, means, strict=True)
    same_dtypes = all(bn.running_mean.dtype == m.dtype == bn.running_var.dtype for bn, m in pairs)
    if len(momenta) == 1 and None not in momenta and same_dtypes:
        (momentum,) = momenta
        running = [bn.running_mean for bn in bns] + [bn.running_var for bn in bns]
        torch._foreach_lerp_(running, [*means, *unbiased], momentum)  # means and variances in one launch
        return
    for bn, mean, var in zip(bns, means, unbiased, strict=True):
        # momentum=None: the cumulative average, as a tensor (no host sync, and torch.compile traces it).
        cumulative = bn.momentum is None
        factor = (1.0 / bn.num_batches_tracked.to(torch.float64)).to(mean.dtype) if cumulative else bn.momentum
        rm, rv = bn.running_mean, bn.running_var
        rm.copy_(rm.to(mean.dtype) * (1.0 - factor) + mean * factor)
        rv.copy_(rv.to(var.dtype) * (1.0 - factor) + var * factor)


# Batch statistics of a dense block's output ride on the output tensor itself (an attribute, gone with
# the tensor): the next BatchNorm that reads the same tensor (a transition's norm, norm5) reuses them
# instead of reducing the buffer again (docs/design.md section 3). They count only while the tensor is
# unmodified (same version counter); a copy or a view of it does not carry them.
_STATS_ATTRIBUTE = "_fastdense_batch_stats"


class KnownStats(NamedTuple):
    """A tensor's per-channel batch statistics, computed once for every BatchNorm that reads it: a
    ``(3, C)`` array (rows ``MEAN``, ``RSTD`` = ``1 / sqrt(var + eps)``, ``VAR`` biased; in the accumulation
    dtype) and that eps."""

    stats: Tensor
    eps: float

    def mean_var_rstd(self, eps: float, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and ``1 / sqrt(var + eps)`` for a BatchNorm of ``eps``: the array's own rstd when the
        eps is the same (no operator), else formed from the variance."""
        mean, rstd, var = (self.stats[row].to(acc) for row in (MEAN, RSTD, VAR))
        return mean, var, rstd if eps == self.eps else torch.rsqrt(var + eps)


def share_batch_stats(t: Tensor, known: KnownStats) -> None:
    """Record the per-channel batch statistics of ``t`` (over N, H, W) for later consumers.
    Not for inference-mode tensors: they have no version counter to tell an in-place change."""
    if not t.is_inference():
        setattr(t, _STATS_ATTRIBUTE, (t._version, known))


def shared_batch_stats(t: Tensor) -> KnownStats | None:
    """The statistics recorded for exactly this, unmodified, tensor; else None."""
    entry = getattr(t, _STATS_ATTRIBUTE, None)
    if entry is None or t.is_inference() or entry[0] != t._version:
        return None
    return entry[1]


def running_stats(bn: nn.BatchNorm2d, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eval mode: the mean and ``1 / sqrt(var + eps)`` the module normalises with."""
    return bn.running_mean.to(acc), torch.rsqrt(bn.running_var.to(acc) + bn.eps)


class Affine(NamedTuple):
    """BatchNorm with given statistics as a per-channel map of ``x``, folded: ``x * scale + shift`` with
    ``shift = bias - mean * scale``, one pass, the formula of PyTorch's own CPU BatchNorm (the torch backend's
    ``torch_ops.normalized_relu``); vectors in the accumulation dtype. ``weight`` is the module's gamma;
    ``frozen``: the statistics are running ones (eval mode), so the map is affine in ``x``.
    """

    mean: Tensor
    scale: Tensor  # weight / sqrt(var + eps)
    bias: Tensor
    shift: Tensor
    weight: Tensor
    rstd: Tensor
    frozen: bool = False

    def channels(self, lo: int, hi: int, spatial_dims: int = 2) -> Affine:
        """The map for channels ``[lo, hi)`` of an ``(N, C, *spatial)`` tensor."""
        vectors = (v[lo:hi].view(1, -1, *[1] * spatial_dims) for v in self[:6])
        return Affine(*vectors, self.frozen)


class NormMap(NamedTuple):
    """A BatchNorm with given statistics as the per-channel map ``(x - mean) * weight * rstd + bias``, held as
    it is stored: ``inv`` is the rstd, or (``from_var``) a variance to which ``eps`` is added first (eval mode's
    running statistics), so that nothing is computed before the map is applied. The Triton kernels take it as
    it is (``kernels.affine``, the vectors formed in registers); the torch backend folds it (``folded``).
    ``weight`` and ``bias`` are the module's parameters, in their own dtype; every vector has unit stride."""

    mean: Tensor
    inv: Tensor
    weight: Tensor
    bias: Tensor
    eps: float = 0.0
    from_var: bool = False

    @classmethod
    def running(cls, bn, weight: Tensor | None = None, bias: Tensor | None = None) -> NormMap:
        """Eval mode's map of a BatchNorm module (or ``RunningNorm``): its running statistics and eps, with
        ``weight`` and ``bias`` (default: the module's own)."""
        weight = bn.weight if weight is None else weight
        bias = bn.bias if bias is None else bias
        return cls(bn.running_mean, bn.running_var, weight, bias, float(bn.eps), True)

    @property
    def acc(self) -> torch.dtype:
        return accumulation_dtype(self.mean.dtype)

    def rstd(self) -> Tensor:
        """``1 / sqrt(var + eps)`` per channel, in the accumulation dtype (an operator or two in eval mode)."""
        inv = as_dtype(self.inv, self.acc)
        return torch.rsqrt(inv + self.eps) if self.from_var else inv

    def folded(self) -> Affine:
        """The map as ``x * scale + shift`` (``Affine``: a few operators on C-vectors)."""
        return affine(self.weight, self.bias, as_dtype(self.mean, self.acc), self.rstd(), frozen=self.from_var)

    def vectors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, scale, bias)`` float32 vectors, as a kernel forms them (the kernels' references)."""
        rstd = self.rstd()
        return self.mean.float(), (self.weight.to(rstd.dtype) * rstd).float(), self.bias.float()

    def channels(self, lo: int, hi: int) -> NormMap:
        """The map of channels ``[lo, hi)``."""
        return NormMap(*(v[lo:hi] for v in self[:4]), self.eps, self.from_var)


def fold_many(maps: list[NormMap]) -> list[Affine]:
    """Every map folded (``NormMap.folded``) by a few multi-tensor operators for all of them (one launch
    each on a GPU): ``rstd`` from the variances (eval), ``scale = weight * rstd``, ``shift = bias - mean *
    scale``; the same vectors, in the accumulation dtype, as folding them one by one."""
    if not maps:
        return []
    acc = maps[0].acc
    rstds = [as_dtype(m.inv, acc) for m in maps]
    from_var = [i for i, m in enumerate(maps) if m.from_var]
    if from_var:
        added = torch._foreach_add([rstds[i] for i in from_var], [maps[i].eps for i in from_var])
        torch._foreach_rsqrt_(added)
        for i, rstd in zip(from_var, added, strict=True):
            rstds[i] = rstd
    weights, biases, means = ([as_dtype(getattr(m, name), acc) for m in maps] for name in ("weight", "bias", "mean"))
    scales = torch._foreach_mul(weights, rstds)
    shifts = torch._foreach_addcmul(biases, means, scales, value=-1)
    parts = zip(means, scales, biases, shifts, weights, rstds, [m.from_var for m in maps], strict=True)
    return [Affine(*vectors) for vectors in parts]


def affine(weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, *, frozen: bool = False) -> Affine:
    """The folded map (two operators on C-vectors); ``frozen``: ``rstd`` and ``mean`` are running statistics."""
    weight, bias = as_dtype(weight, rstd.dtype), as_dtype(bias, rstd.dtype)
    scale = weight * rstd
    shift = torch.addcmul(bias, mean, scale, value=-1)
    return Affine(mean, scale, bias, shift, weight, rstd, frozen)


def batch_norm_backward_in_place(
    d_pre: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, chunk_elements: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Training BatchNorm's backward for an ``(N, C, *spatial)`` input ``x``, with ``d_pre`` (the output
    gradient) overwritten by the input gradient: no input-sized temporary, only slabs of at most
    ``chunk_elements`` along the first spatial dimension. Returns ``(dx, dweight, dbias)``.

    ``dx = scale * (d_pre - sum(d_pre) / m - xhat * sum(d_pre * xhat) / m)``, folded per channel into
    ``d_pre * scale + x * a + b``."""
    spatial_dims, acc = x.dim() - 2, mean.dtype
    dims, m = (0, *range(2, x.dim())), x.numel() // x.shape[1]

    def channel(v: Tensor) -> Tensor:
        return v.view(1, -1, *[1] * spatial_dims)

    step = max(1, chunk_elements // max(x.numel() // max(x.shape[2], 1), 1))
    d_bias = d_pre.sum(dims, dtype=acc)
    slabs = ((d_pre[:, :, lo : lo + step], x[:, :, lo : lo + step]) for lo in range(0, x.shape[2], step))
    d_gx = sum((d_slab * x_slab).sum(dims, dtype=acc) for d_slab, x_slab in slabs)
    d_weight = torch.addcmul(d_gx, mean, d_bias, value=-1.0).mul_(rstd)  # sum(d_pre * xhat)
    scale = weight.to(acc) * rstd
    a, b = folded_input_grad(scale, rstd, mean, d_bias, d_weight, m)
    d_pre.mul_(channel(scale)).addcmul_(x, channel(a)).add_(channel(b))
    return d_pre, d_weight, d_bias


def folded_input_grad(scale: Tensor, rstd: Tensor, mean: Tensor, sum_g: Tensor, sum_gxhat: Tensor, m: int):
    """Training BatchNorm's input gradient ``scale * (g - sum_g / m - xhat * sum_gxhat / m)``, with
    ``xhat = (x - mean) * rstd``, as the per-channel ``(a, b)`` of ``g * scale + x * a + b``: five operators
    on C-vectors (each one is a launch on a GPU)."""
    t = scale / -m
    a = torch.mul(t, rstd).mul_(sum_gxhat)  # -scale rstd sum_gxhat / m
    return a, torch.addcmul(t * sum_g, mean, a, value=-1.0)  # -scale sum_g / m - mean a


def input_grad_from_sums(
    d_pre: Tensor, xhat: Tensor, d_bias: Tensor, d_weight: Tensor, scale: Tensor, count: int, training: bool
) -> Tensor:
    """BatchNorm's input gradient from its output gradient ``d_pre`` (overwritten) and the sums
    ``d_bias = sum(d_pre)``, ``d_weight = sum(d_pre * xhat)`` over the ``count`` normalised values.

    ``scale`` is ``weight * rstd``; ``xhat`` is overwritten too.
    """
    if training:
        d_pre.sub_(d_bias / count).sub_(xhat.mul_(d_weight / count))
    return d_pre.mul_(scale)
