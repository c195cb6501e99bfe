"""What the network does across module boundaries: the BatchNorms after a dense block reuse its batch
statistics, and triton inference hands one buffer to the next (stem and transitions write into the
next block's buffer). Both must stay invisible: same results as torchvision, hooks still honoured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastdense
from fastdense import batchnorm, bn_relu_pool
from fastdense.bn_relu_pool import bn_relu_pool as bn_relu_pool_op
from fastdense.tools.verify import relative_error

from .test_densenet import network_pair


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_transitions_and_norm5_reuse_the_blocks_statistics(monkeypatch):
    """Training, torch backend: of the BatchNorm-ReLU-pool ops only the stem reduces its input; the
    transitions and norm5 take the statistics their block computed. Results match torchvision."""
    ref, fast = network_pair(torch.float64)
    ref.train(), fast.train()
    # the stem's input by PyTorch's BatchNorm (before its max pool); a channels-last input otherwise as rows,
    # any other over its dimensions
    names = ("_native_training_norm", "batch_stats", "column_var_mean")
    reductions = [count_calls(monkeypatch, bn_relu_pool, name) for name in names]
    x = torch.randn(3, 3, 32, 30, dtype=torch.float64, requires_grad=True)
    out, expected = fast(x), ref(x)
    assert list(map(len, reductions)) == [1, 0, 0]  # the stem's norm0 only
    assert relative_error(out, expected) <= 1e-12
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), ref_p in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert relative_error(p.grad, ref_p.grad) <= 1e-9, name
    for (name, b), ref_b in zip(fast.named_buffers(), ref.buffers(), strict=True):
        assert relative_error(b, ref_b) <= 1e-12, name


def test_shared_statistics_are_dropped_when_the_output_changes_in_place():
    """A block output modified in place (version counter moves) is reduced again, not trusted."""
    _, fast = network_pair(torch.float64)
    block, transition = fast.features.denseblock1, fast.features.transition1
    block.train(), transition.train()
    x = torch.randn(2, block.num_input_features, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        assert batchnorm.shared_batch_stats(out) is not None
        out.mul_(3.0).add_(1.0)
        assert batchnorm.shared_batch_stats(out) is None
        fresh = out.clone()  # a copy never carries statistics
        assert batchnorm.shared_batch_stats(fresh) is None
        reference = nn.BatchNorm2d(out.shape[1], dtype=torch.float64).train()
        reference.load_state_dict(transition.norm.state_dict())
        got = bn_relu_pool_op(out, transition.norm, transition.pool)
        expected = transition.pool(torch.relu(reference(fresh)))
    assert relative_error(got, expected) <= 1e-12


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_inference_passes_one_buffer_to_the_next(monkeypatch, training):
    """No autograd on the triton backend: every block runs in a buffer the op before it wrote into;
    outputs and running statistics as torchvision's."""
    ref, fast = network_pair(torch.float32, backend="triton")
    ref.train(training), fast.train(training)
    in_buffer = count_calls(monkeypatch, fastdense.FastDenseBlock, "forward_in_buffer")
    reductions = count_calls(monkeypatch, bn_relu_pool, "norm_statistics")
    x = torch.randn(2, 3, 36, 29)
    with torch.no_grad():
        out, expected = fast(x), ref(x)
    assert len(in_buffer) == len(fast.dense_blocks())
    assert relative_error(out, expected) <= 1e-5
    for (name, b), ref_b in zip(fast.named_buffers(), ref.buffers(), strict=True):
        assert relative_error(b.double(), ref_b.double()) <= 1e-5, name
    if training:  # the transitions and norm5 got their block's statistics, passed in
        assert all(kwargs["known"] is not None for _, kwargs in reductions[1:])
        assert len(reductions) == len(in_buffer) + 1


@pytest.mark.parametrize("library", ["torchvision", "timm"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_converted_model_passes_one_buffer_to_the_next_too(monkeypatch, library, training):
    """A converted torchvision or timm DenseNet keeps its own forward and head; its ``features`` hands one
    buffer to the next as the built model's does (timm's stem: conv0, norm0 with the ReLU inside, pool0)."""
    import copy

    from .test_frameworks import timm_pair

    ref = timm_pair()[0].float() if library == "timm" else network_pair(torch.float32)[0]
    fast = fastdense.convert(copy.deepcopy(ref), backend="triton")
    ref.train(training), fast.train(training)
    in_buffer = count_calls(monkeypatch, fastdense.FastDenseBlock, "forward_in_buffer")
    x = torch.randn(2, 3, 36, 29)
    with torch.no_grad():
        out, expected = fast(x), ref(x)
    assert len(in_buffer) == sum(isinstance(m, fastdense.FastDenseBlock) for m in fast.modules()) >= 2
    assert relative_error(out, expected) <= 1e-5
    for (name, b), ref_b in zip(fast.named_buffers(), ref.buffers(), strict=True):
        assert relative_error(b.double(), ref_b.double()) <= 1e-5, name


def test_triton_inference_with_hooks_runs_module_by_module(monkeypatch):
    """A forward hook anywhere in ``features`` must fire, so the network then runs module by module."""
    ref, fast = network_pair(torch.float32, backend="triton")
    ref.eval(), fast.eval()
    seen = []
    fast.features.transition1.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    in_buffer = count_calls(monkeypatch, fastdense.FastDenseBlock, "forward_in_buffer")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, expected = fast(x), ref(x)
    assert seen and not in_buffer
    assert relative_error(out, expected) <= 1e-5
