"""Resources (issue 7): no hidden caches that grow, safe concurrent inference, and no reads of memory
that was never written (allocations poisoned with NaN while fastdense runs)."""

from __future__ import annotations

import gc
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .helpers import block_pair
from .test_densenet import network_pair
from .test_triton_backend import DEVICE

ALLOCATIONS = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
}


class PoisonAllocations(TorchDispatchMode):
    """Every uninitialised floating-point allocation comes back filled with NaN, so an op or kernel that
    reads memory it never wrote turns the result into NaN instead of passing by luck."""

    fastdense_counter = True  # observed.OWN_COUNTER: poisons the fused path (a user's mode sees the modules)

    def __init__(self) -> None:
        super().__init__()
        self.poisoned = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in ALLOCATIONS and out.is_floating_point():
            out.fill_(math.nan)
            self.poisoned += 1
        return out


@pytest.fixture
def poisoned_allocations():
    with PoisonAllocations() as mode:
        yield mode


def run_step(model, x, training):
    model.train(training)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_op_reads_memory_it_did_not_write(backend, memory_efficient, training):
    """The same step with and without poisoned allocations: equal results, nothing NaN."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    _, fast = network_pair(dtype, memory_efficient=memory_efficient, backend=backend, drop_rate=0.0)
    fast = fast.to(DEVICE if backend == "triton" else "cpu")
    x = torch.randn(2, 3, 33, 30, dtype=dtype, device=next(fast.parameters()).device)
    state = {k: v.clone() for k, v in fast.state_dict().items()}
    clean = run_step(fast, x, training)
    fast.load_state_dict(state)
    with PoisonAllocations() as mode:
        poisoned = run_step(fast, x, training)
        with torch.no_grad():  # the inference path (buffers handed from op to op on triton)
            inference = fast.train(training)(x)
    assert mode.poisoned > 10  # the mode did see fastdense's buffers
    for a, b in zip((clean[0], clean[1], *clean[2]), (poisoned[0], poisoned[1], *poisoned[2]), strict=True):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    assert torch.isfinite(inference).all()


def test_poisoning_catches_a_read_of_unwritten_memory():
    """The fixture itself: an op that reads a fresh allocation produces NaN."""
    with PoisonAllocations():
        t = torch.empty(4, 4)
        assert torch.isnan(t).all()
        assert not torch.isnan(torch.zeros(4, 4)).any()


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_memory_stays_bounded_over_calls_with_changing_shapes(backend):
    """Nothing is cached between calls: after many calls of changing batch and spatial size (training
    and inference), no more tensors are alive than after the first round, and the modules hold only
    their parameters and buffers."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    _, fast = network_pair(dtype, backend=backend)
    fast = fast.to(DEVICE if backend == "triton" else "cpu")
    device = next(fast.parameters()).device
    shapes = [(2, 3, 32, 32), (3, 3, 40, 36), (2, 3, 17, 64), (4, 3, 32, 20)]

    def rounds(count):
        for _ in range(count):
            for shape in shapes:
                run_step(fast, torch.randn(shape, dtype=dtype, device=device), training=True)
                with torch.no_grad():
                    fast.eval()(torch.randn(shape, dtype=dtype, device=device))

    rounds(1)
    baseline = live_tensors()
    rounds(3)
    assert live_tensors() <= baseline
    owned = {id(t) for t in (*fast.parameters(), *fast.buffers())}
    for module in fast.modules():
        for name, value in vars(module).items():
            assert not (isinstance(value, torch.Tensor) and id(value) not in owned), f"{module}: cached {name}"


def test_concurrent_inference_from_several_threads():
    """Eval-mode calls share no mutable state: four threads at once give the sequential results.
    (Training-mode calls update running statistics, which races exactly as nn.BatchNorm2d does.)"""
    _, fast = network_pair(torch.float64)
    fast.eval()
    inputs = [torch.randn(2, 3, 32 + 4 * i, 32, dtype=torch.float64) for i in range(8)]
    with torch.no_grad():
        expected = [fast(x) for x in inputs]
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(fast, inputs))
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got, want)


def test_block_buffers_are_fresh_per_call():
    """Each call returns its own buffer: an earlier output is not overwritten by a later call."""
    _, fast = block_pair(2, 3, 2, 3)
    fast.eval()
    x1, x2 = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        out1 = fast(x1)
        snapshot = out1.clone()
        fast(x2)
    assert torch.equal(out1, snapshot)
