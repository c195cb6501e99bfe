"""How the work is done, not only its result: no concatenation anywhere, and O(L) saved memory."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import fastdense

from .helpers import block_pair
from .test_densenet import SMALL
from .test_triton_backend import DEVICE

CONCATENATIONS = {"aten.cat.default", "aten.cat.out", "aten.concat.default", "aten.concatenate.default"}


class RecordOps(TorchDispatchMode):
    """Every ATen operator that runs, forward and backward (the dispatcher sees them all)."""

    fastdense_counter = True  # observed.OWN_COUNTER: inspects the fused path (a user's mode sees the modules)

    def __init__(self):
        super().__init__()
        self.ops = set()
        self.calls: list[str] = []  # every call, in order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def ops_of_training_step(model, x):
    with RecordOps() as recorder:
        model.train()(x).sum().backward()
        model.eval()(x).sum().backward()
    return recorder.ops


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_no_concatenation_in_forward_or_backward(memory_efficient):
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    reference_ops = ops_of_training_step(torchvision.models.DenseNet(**SMALL), x)
    assert reference_ops & CONCATENATIONS, "the recorder must see torchvision's torch.cat"
    ops = ops_of_training_step(fastdense.FastDenseNet(**SMALL, memory_efficient=memory_efficient), x)
    assert "aten.convolution_backward.default" in ops  # the backward was recorded too
    assert not ops & CONCATENATIONS


def saved_activation_bytes(module, x):
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = module(x)
    return sum(storages.values()), out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_block_keeps_only_the_buffer_and_per_channel_vectors(memory_efficient, backend):
    """memory_efficient=True: the buffer plus O(C) statistics; False adds one bottleneck per layer.
    torchvision keeps the concatenations, BatchNorm and ReLU outputs of every layer: O(L^2).
    The triton backend's forward saves exactly what the torch backend's does."""
    layers, c0, bn_size, growth, (n, h, w) = 16, 16, 4, 8, (4, 8, 8)
    device = DEVICE if backend == "triton" else "cpu"
    ref, fast = block_pair(
        layers, c0, bn_size, growth, dtype=torch.float32, memory_efficient=memory_efficient, backend=backend
    )
    ref, fast = ref.to(device), fast.to(device)
    x = torch.randn(n, c0, h, w, device=device, requires_grad=True)
    saved, out = saved_activation_bytes(fast.train(), x)
    m, c_total, item = n * h * w, c0 + layers * growth, 4
    buffer_bytes = out.untyped_storage().nbytes()
    assert buffer_bytes == m * c_total * item
    vectors = 3 * c_total * item + layers * 3 * bn_size * growth * item  # batch mean, var, rstd of both norms
    bottlenecks = 0 if memory_efficient else layers * m * bn_size * growth * item
    assert saved <= buffer_bytes + vectors + bottlenecks
    tv_saved, _ = saved_activation_bytes(ref.float().train(), x)
    assert tv_saved > 4 * saved


def test_backward_allocates_nothing_for_the_operators_extra_outputs():
    """The block operator returns its statistics and saved tensors as extra outputs; autograd must not
    hand backward a zero-filled gradient for each of them (one per saved bottleneck: M x 4k each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroFills(TorchDispatchMode):
        fastdense_counter = True  # observed.OWN_COUNTER: inspects the fused path

        def __init__(self):
            super().__init__()
            self.shapes, self.ops = [], set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.add(func)
            if func in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default):
                self.shapes.append(tuple(out.shape))
            return out

    _, fast = block_pair(3, 4, 2, 3, dtype=torch.float32)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = fast.train()(x)
    with ZeroFills() as zero_fills:
        out.sum().backward()
    assert torch.ops.fastdense.dense_block_backward.default in zero_fills.ops  # the mode saw the backward
    bottleneck_shape = (2 * 5 * 5, 2 * 3)
    assert bottleneck_shape not in zero_fills.shapes, zero_fills.shapes
