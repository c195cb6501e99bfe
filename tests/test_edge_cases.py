"""Edge cases a drop-in replacement must get right (issue 7): sliced inputs, shapes that change between
calls, dtype conversions after construction, copies and pickles, state_dict round trips, double
backward. Bad input (rank, channels, dtypes, devices), N = 0, N = 1, NaN/Inf: tests/test_bad_input.py."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from fastdense.tools.verify import relative_error

from .helpers import TOLERANCE, assert_rel_close, assert_same_grads_and_buffers, block_pair
from .test_densenet import network_pair


def grads_and_output(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return out, x.grad


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sliced_non_contiguous_input(training):
    ref, fast = block_pair(3, 4, 2, 3)
    ref.train(training), fast.train(training)
    big = torch.randn(3, 9, 11, 13, dtype=torch.float64)
    x = big[:, 2:6, 1::2, ::3]  # channel slice, strided rows and columns
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    out, x_grad = grads_and_output(fast, x)
    ref_out, ref_x_grad = grads_and_output(ref, x)
    assert_rel_close(out, ref_out, TOLERANCE[torch.float64], "output")
    assert_rel_close(x_grad, ref_x_grad, TOLERANCE[torch.float64], "input grad")
    assert_same_grads_and_buffers(fast, ref, TOLERANCE[torch.float64])


def test_changing_batch_and_spatial_size_between_calls():
    """Training calls of different shapes in a row: outputs, gradients and the running statistics they
    accumulate stay torchvision's."""
    ref, fast = network_pair(torch.float64)
    ref.train(), fast.train()
    for shape in [(2, 3, 32, 32), (3, 3, 45, 37), (2, 3, 17, 64), (4, 3, 32, 32)]:
        x = torch.randn(shape, dtype=torch.float64)
        out, x_grad = grads_and_output(fast, x)
        ref_out, ref_x_grad = grads_and_output(ref, x)
        assert_rel_close(out, ref_out, TOLERANCE[torch.float64], f"output {shape}")
        assert_rel_close(x_grad, ref_x_grad, TOLERANCE[torch.float64], f"input grad {shape}")
    assert_same_grads_and_buffers(fast, ref, TOLERANCE[torch.float64])


@pytest.mark.parametrize("convert", ["double", "float", "half", "bfloat16", "to-float64"])
def test_dtype_conversion_after_construction(convert):
    """``.double()``, ``.half()``, ``model.to(dtype)``... on a built model: it runs in the new dtype,
    as close to torchvision in that dtype as torchvision is to itself in float64."""
    ref, fast = network_pair(torch.float32)
    gold = copy.deepcopy(ref).double()
    if convert == "to-float64":
        ref, fast = ref.to(torch.float64), fast.to(torch.float64)
    else:
        ref, fast = getattr(ref, convert)(), getattr(fast, convert)()
    dtype = next(fast.parameters()).dtype
    ref.eval(), fast.eval(), gold.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out, ref_out, gold_out = fast(x.to(dtype)), ref(x.to(dtype)), gold(x)
    assert out.dtype == dtype
    floor = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 0.0)
    assert relative_error(out, gold_out) <= max(floor, 2 * relative_error(ref_out, gold_out))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_and_pickles_behave_like_the_original(how):
    _, fast = network_pair(torch.float64, backend="torch", memory_efficient=True)
    fast.train()
    if how == "deepcopy":
        twin = copy.deepcopy(fast)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(fast))
    else:
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert twin.backend == "torch" and twin.dense_blocks()[0].memory_efficient
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, x_grad = grads_and_output(fast, x)
    twin_out, twin_x_grad = grads_and_output(twin, x)
    assert torch.equal(out, twin_out) and torch.equal(x_grad, twin_x_grad)
    for (name, p), twin_p in zip(fast.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, twin_p.grad), name
    for (name, b), twin_b in zip(fast.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(b, twin_b), name


def test_state_dict_round_trip_through_a_file_and_torchvision():
    ref, fast = network_pair(torch.float64)
    fast.train()(torch.randn(2, 3, 32, 32, dtype=torch.float64))  # move the running statistics
    buffer = io.BytesIO()
    torch.save(fast.state_dict(), buffer)
    buffer.seek(0)
    ref.load_state_dict(torch.load(buffer), strict=True)
    _, again = network_pair(torch.float64, seed=5)
    again.load_state_dict(ref.state_dict(), strict=True)
    for (name, value), other in zip(fast.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(value, other), name


def test_double_backward_raises_clearly():
    """Second derivatives are not supported: differentiating the gradient raises instead of returning
    something wrong."""
    _, fast = network_pair(torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fast(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
