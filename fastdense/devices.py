"""Whose operator choices the torch backend makes: the tensors' device type, or the one ``counted_as`` names.

The torch backend picks some operators and sizes by device type (larger chunks and one-pass reductions on
a GPU, where launches and memory traffic are the cost; in-place steps on the CPU, where memory is what
stops 3-D volumes). The traffic counter runs on fake CPU tensors but counts a GPU's step: it sets the
device type here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# The device type the choices follow; None: the tensors' own. A plain module global, not a ContextVar:
# torch.compile reads it inside every block's forward, and Dynamo (torch 2.11) cannot trace
# ``ContextVar.get`` (fullgraph=True raised, a plain compile broke the graph at every block). Only the
# counting tools set it, for the duration of one count.
_counted_as: str | None = None


@contextlib.contextmanager
def counted_as(device_type: str):
    """Take the operator choices of ``device_type`` ("cuda" or "cpu") whatever the tensors' device."""
    global _counted_as
    previous, _counted_as = _counted_as, device_type
    try:
        yield
    finally:
        _counted_as = previous


def device_kind(device: torch.device) -> str:
    """The device type whose choices tensors on ``device`` get (the backend too: counting a GPU's step on
    fake CPU tensors runs the backend a GPU would run)."""
    return _counted_as or device.type


def device_type(t: Tensor) -> str:
    return device_kind(t.device)
