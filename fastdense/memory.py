"""Will it fit? The peak memory of one training (or inference) step, counted without running it.

``estimate_peak_memory(model, input_shape, ...)`` copies the model onto fake tensors (shapes, no data:
any size counts on any machine in seconds) and counts one step there as a step after the first runs (the
gradients of the step before and the optimizer's state exist: made up front, without a first step), with
PyTorch's own ``MemTracker``
(``torch.distributed._tools.mem_tracker``), which sorts every live tensor into parameters, buffers,
gradients, optimizer state, activations and temporaries. fastdense's registered block operators are opened
(their implementation runs under the tracker, so a block's buffers and backward temporaries count as
they are allocated), and the torch backend takes the operator choices of the device named (a GPU's by
default); the triton backend's launches are recorded instead of run, so its buffers count too.

The count is what PyTorch's allocator would have in use at the step's peak, nothing more: not the CUDA
context, cuDNN's workspaces or the caching allocator's fragmentation. ``fastdense.tools.fit`` adds a
stated reserve for those before it compares with a card.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .block_op import OPENED
from .devices import counted_as
from .observed import OWN_COUNTER

CATEGORIES = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp", "Other")
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
}


class PeakMemory(int):
    """The peak bytes of one step (``int(result)``), with ``by_category`` (bytes per MemTracker category at
    that peak, summing to it) and ``extra`` (the peak less what was in use when the step began: what a
    measurement of the step's own peak, like the benchmark's, sees)."""

    by_category: dict[str, int]
    extra: int

    def __new__(cls, peak: int, by_category: dict[str, int], extra: int) -> PeakMemory:
        result = super().__new__(cls, peak)
        result.by_category, result.extra = by_category, extra
        return result

    @property
    def peak(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        split = ", ".join(f"{name} {value / 2**20:.1f}" for name, value in self.by_category.items() if value)
        return f"PeakMemory({self / 2**20:.1f} MiB: {split}; extra {self.extra / 2**20:.1f})"


class _OpenBlockOps(TorchDispatchMode):
    """Run fastdense's block operators' implementation, not their fake, so their allocations count."""

    fastdense_counter = True  # observed.OWN_COUNTER

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in OPENED:
            with self:
                return OPENED[func](*args, **kwargs)
        return func(*args, **kwargs)


def fake_copy(model: nn.Module, mode, memory_format: torch.memory_format | None = None) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors of ``mode`` (no data is copied),
    its convolution weights in ``memory_format`` if given (``model.to(memory_format=...)`` cannot swap fake
    parameters in)."""

    def fake(t):
        t = mode.from_tensor(t)
        if memory_format is not None and t.dim() == (4 if memory_format == torch.channels_last else 5):
            with mode:
                t = t.contiguous(memory_format=memory_format)
        return t

    memo = {id(p): nn.Parameter(fake(p), requires_grad=p.requires_grad) for p in model.parameters()}
    memo |= {id(b): fake(b) for b in model.buffers()}
    return copy.deepcopy(model, memo)


def estimate_peak_memory(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    train: bool = True,
    optimizer: str = "sgd",
    autocast_dtype: torch.dtype | None = None,
    device: str = "cuda",
    channels_last: bool = False,
) -> PeakMemory:
    """The peak bytes of one step of ``model`` on an input of ``input_shape``, counted on fake tensors.

    train: a training step (forward, cross-entropy on integer labels, backward, ``optimizer`` "sgd" with
    momentum or "adamw"); else an inference forward (``torch.inference_mode``). The step counted is the
    second, so gradients and optimizer state exist. autocast_dtype: the step under ``torch.autocast`` in
    that dtype. device: "cuda" or "cpu", whose operator choices fastdense's torch backend takes.
    channels_last: the input (and the model) in channels-last memory format. The model is not touched.
    Counted on the CPU in seconds, whatever the sizes (every tensor is fake).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from .kernels.launch import recording

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memory_format = None
    if channels_last and len(input_shape) in (4, 5):
        memory_format = torch.channels_last if len(input_shape) == 4 else torch.channels_last_3d
    net = fake_copy(model, mode, memory_format).train(train)
    with mode, counted_as(device), recording(keep=False):  # the triton backend's launches: skipped
        x = torch.empty(tuple(input_shape), memory_format=memory_format or torch.contiguous_format)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = OPTIMIZERS[optimizer](params) if train else None
        autocast = (
            torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        )
        labels = None

        def step():
            nonlocal labels
            if not train:
                with torch.inference_mode(), autocast:
                    net(x)
                return
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = net(x)
                if labels is None:
                    labels = torch.zeros(out.shape[0], dtype=torch.long)
                loss = F.cross_entropy(out.float(), labels)
            loss.backward()
            opt.step()

        if train:  # what a first step leaves: every gradient, and the optimizer's state after one update
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
        tracker = MemTracker()
        tracker.track_external(net, *([opt] if opt is not None else []), x)
        setattr(tracker, OWN_COUNTER, True)  # this count's own mode, not a user's: the blocks stay fused
        with tracker, _OpenBlockOps():
            start = _totals(tracker.get_tracker_snapshot("current"))
            step()
        peak = _totals(tracker.get_tracker_snapshot("peak"))
    by_category = {name: peak.get(name, 0) for name in CATEGORIES}
    return PeakMemory(peak["Total"], by_category, peak["Total"] - start["Total"])


def _totals(snapshot: dict) -> dict[str, int]:
    """One device's figures by category name (the fake tensors all live on one device)."""
    (by_type,) = snapshot.values() if snapshot else ({},)
    return {getattr(key, "value", key): value for key, value in by_type.items()} | {"Total": by_type.get("Total", 0)}
