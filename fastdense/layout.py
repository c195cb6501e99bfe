"""The two views of a feature map that every op here takes: images and rows.

A channels-last ``(N, C, *spatial)`` tensor is, in memory, a row-major ``M x C`` matrix with
``M = N * prod(spatial)``: channel ``c`` is column ``c``. A dense block's buffer is such a matrix, and
a layer's input is a column prefix of it (a strided sub-matrix, no copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


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


def channels_last(t: Tensor) -> Tensor:
    """A 4-D or 5-D tensor in channels-last memory (a copy unless it already is); others unchanged."""
    layout = _CHANNELS_LAST.get(t.dim())
    return t if layout is None else t.contiguous(memory_format=layout)
