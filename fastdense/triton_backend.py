"""The ``triton`` backend's forward: the block's kernels from ``kernels/`` (DESIGN.md section 3).

The layer loop, running-statistics updates and the saved state are the torch backend's
(``torch_backend.block_forward``); only the three kernels differ: segment statistics by a reduction
kernel, BN-ReLU-1x1 conv as one GEMM with norm2's statistics (training) or norm2-ReLU (eval) in its
epilogue, and the 3x3 conv as an implicit GEMM with the norm2-ReLU prologue that writes straight into
the buffer slice and emits the new segment's statistics. The forward saves exactly what the torch
backend's backward reads, so training runs that backward until the fused one lands.

``kernels`` (and so ``triton``) is imported on first use: ``TRITON_INTERPRET=1`` must be set before
Triton is imported, and CPU-only installs need not have Triton at all.
"""

from __future__ import annotations

import functools
import os

import torch

from .torch_backend import Ops, conv3x3_into

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
def _kernels():
    from kernels import affine, bn_relu_gemm, conv3x3, stats

    return affine, bn_relu_gemm, conv3x3, stats


def _column_stats(cols):
    return _kernels()[3].column_stats(cols)


def _bottleneck(x, norm1, w1, stats, epilogue):
    affine, gemm, _, _ = _kernels()
    second = affine.affine_vectors(epilogue) if epilogue is not None else None
    return gemm.bn_relu_gemm(x, affine.affine_vectors(norm1), w1, epilogue=second, stats=stats)


def _new_features_triton(bottleneck, norm2, w2, nhw, out, noise, stats):
    affine, _, conv, _ = _kernels()
    prologue = affine.affine_vectors(norm2) if norm2 is not None else None
    return conv.conv3x3(bottleneck, w2, nhw, out, prologue=prologue, noise=noise, stats=stats)


def _new_features_cudnn(bottleneck, norm2, w2, nhw, out, noise, stats):
    return conv3x3_into(bottleneck, norm2, w2, nhw, out, noise, stats, column_stats=_column_stats)


def _norm1_backward(d_bottleneck, x, norm1, rstd1, w1c, grad_sum, coef, need_weight):
    """dgrad into G with norm1's sums, and wgrad, by the kernels (mask recomputed as the forward's)."""
    affine, *_ = _kernels()
    from kernels.bn_relu_gemm_backward import norm1_gemm_backward

    vectors = affine.affine_vectors(norm1)
    sum_p, sum_px, d_w1 = norm1_gemm_backward(
        d_bottleneck.contiguous(), x, vectors, norm1.mean, coef, w1c, grad_sum, need_weight
    )
    return sum_px.mul_(rstd1), sum_p, d_w1


def _finalize(g, x, d_out, stats, noise):
    from kernels.finalize import finalize
    from kernels.launch import unit_columns

    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if not unit_columns(d_out):  # an output gradient that is not channels_last: its rows view is strided
        d_out = d_out.contiguous()
    return finalize(g, x, d_out, out, stats, noise)


def triton_ops() -> Ops:
    """The Triton backend's kernels, with the 3x3 conv chosen by ``FASTDENSE_CONV3X3``."""
    new_features = _new_features_triton if conv3x3_choice() == "triton" else _new_features_cudnn
    return Ops(
        _column_stats,
        _bottleneck,
        new_features,
        fuses_eval_norm2=True,
        norm1_backward=_norm1_backward,
        finalize=_finalize,
    )
