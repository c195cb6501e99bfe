"""How the kernels are launched: autotuned on a GPU, one fixed configuration under the interpreter.

``TRITON_INTERPRET=1`` (read by Triton when it is first imported) runs every program instance with
NumPy on CPU tensors. ``triton.autotune`` cannot run there (no GPU driver), so interpreted launches use
one small fixed configuration per kernel; compiled launches are autotuned. Two interpreter bugs
(triton 3.8) are worked around behind the kernels' ``INTERPRETED`` flag: ``tl.dot`` on bfloat16
operands returns garbage (operands are upcast to float32) and fp32 -> bf16 casts truncate instead of
rounding to nearest even (``kernels.affine.rounded`` rounds on the bits first).
"""

from __future__ import annotations

import math
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# FASTDENSE_AUTOTUNE=0 launches compiled kernels with the fixed configuration too: GPU tests over many
# small shapes then compile one variant per kernel instead of tuning every shape.
AUTOTUNE = not INTERPRET and os.environ.get("FASTDENSE_AUTOTUNE", "1") != "0"


def tuned(
    configs: list[triton.Config],
    key: list[str],
    reset_to_zero: list[str] | None = None,
    interpret: triton.Config | None = None,
    restore_value: list[str] | None = None,
):
    """``triton.autotune`` on a GPU; under the interpreter (or without ``AUTOTUNE``) a launcher that
    always uses ``interpret`` (default: the first configuration)."""

    def wrap(kernel):
        if not AUTOTUNE:
            return _FixedConfig(kernel, interpret or configs[0])
        # restore_value: arguments a kernel accumulates into, put back after each timed trial.
        return triton.autotune(configs, key=key, reset_to_zero=reset_to_zero, restore_value=restore_value)(kernel)

    return wrap


class _FixedConfig:
    """``kernel[grid](...)`` with one configuration's meta-parameters filled in."""

    def __init__(self, kernel, config: triton.Config) -> None:
        self.kernel, self.meta = kernel, dict(config.kwargs)
        self.options = {"num_warps": config.num_warps, "num_stages": config.num_stages}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            resolved = grid(self.meta) if callable(grid) else grid
            return self.kernel[resolved](*args, **kwargs, **self.meta, **self.options)

        return launch


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: fp32 GEMMs follow cuDNN's TF32 switch,
    like the convolutions they replace (``torch.backends.cudnn.allow_tf32``, on by default)."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def check_kernel_tensors(*tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"fastdense Triton kernels need CUDA tensors (got a {t.device} tensor); on the CPU they run only "
                "under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )


# Row (pixel) indices are int32 inside the kernels (kernels/offsets.py); the margin leaves room for a
# tile hanging over the last row and a 3x3 tap reaching one image row further.
MAX_ROWS = 2**31 - 2**20


def check_rows(rows: int, what: str) -> None:
    """Refuse a launch whose row count (pixels, N * H * W) int32 indices cannot address."""
    if rows > MAX_ROWS:
        raise ValueError(
            f"{what}: {rows} rows (N * H * W pixels) is more than the {MAX_ROWS} the kernels index; "
            "split the batch (or use backend='torch')"
        )


def bucket(n: int) -> int:
    """A size rounded up to a power of two: autotuning keys on it (``*_BUCKET`` kernel arguments), so a
    network's dozens of layer widths share a few tuning runs instead of one each."""
    return triton.next_power_of_2(max(int(n), 1))


def smallest(configs: list[triton.Config], *names: str) -> int:
    """The smallest product of the meta-parameters ``names`` over ``configs`` (e.g. rows per program),
    which sizes the per-program partial-statistics arrays for any configuration the tuner picks."""
    return min(math.prod(c.kwargs[n] for n in names) for c in configs)


def unit_columns(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor's columns are adjacent in memory (rows may have any stride). A single
    column counts whatever its stride: the kernels never step across columns then."""
    return t.shape[1] <= 1 or t.stride(1) == 1
