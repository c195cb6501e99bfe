"""Whose operator choices the torch backend makes: the tensors' device type, or the one ``counted_as`` names.

The torch backend picks some operators and sizes by device type (larger chunks and one-pass reductions on
a GPU, where launches and memory traffic are the cost; in-place steps on the CPU, where memory is what
stops 3-D volumes). The traffic counter runs on fake CPU tensors but counts a GPU's step: it sets the
device type here.
"""

from __future__ import annotations

import contextlib
import contextvars

from torch import Tensor

# The device type the choices follow; None: the tensors' own.
_COUNTED_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastdense_counted_as", default=None)


@contextlib.contextmanager
def counted_as(device_type: str):
    """Take the operator choices of ``device_type`` ("cuda" or "cpu") whatever the tensors' device."""
    token = _COUNTED_AS.set(device_type)
    try:
        yield
    finally:
        _COUNTED_AS.reset(token)


def device_type(t: Tensor) -> str:
    return _COUNTED_AS.get() or t.device.type
