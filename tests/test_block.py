"""FastDenseBlock against torchvision's _DenseBlock in float64: outputs, every gradient, running stats."""

from __future__ import annotations

import pytest
import torch

import fastdense
from fastdense import torch_ops
from fastdense.devices import counted_as

from .helpers import TOLERANCE, assert_rel_close, assert_same_grads_and_buffers, block_pair

# (num_layers, num_input_features, bn_size, growth_rate): one-layer blocks, growth 1, one input channel.
CONFIGS = [(1, 3, 2, 1), (3, 5, 2, 4), (4, 1, 1, 3), (2, 6, 4, 2)]
# (N, H, W): odd sizes, N = 1 with spatial extent, H = 1.
SHAPES = [(2, 7, 9), (1, 5, 3), (3, 1, 4)]


def run_steps(fast, ref, shape, c0, *, training, channels_last, steps=3, dtype=torch.float64, seed=0):
    """Several forward/backward passes on fresh inputs; gradients accumulate as in training."""
    fast.train(training)
    ref.train(training)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        n, h, w = shape
        x = torch.randn(n, c0, h, w, generator=generator, dtype=torch.float64).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_fast, out_ref = fast(x_fast), ref(x_ref)
        assert out_fast.shape == out_ref.shape
        grad = torch.randn(out_ref.shape, generator=generator, dtype=torch.float64).to(dtype)
        out_fast.backward(grad)
        out_ref.backward(grad)
        yield step, out_fast, out_ref, x_fast.grad, x_ref.grad


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "L{}-C{}-bn{}-k{}".format(*c))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-W{}".format(*s))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_matches_torchvision_float64(config, shape, training, memory_efficient, channels_last):
    num_layers, c0, bn_size, growth = config
    ref, fast = block_pair(num_layers, c0, bn_size, growth, memory_efficient=memory_efficient)
    tol = TOLERANCE[torch.float64]
    for step, out_fast, out_ref, dx_fast, dx_ref in run_steps(
        fast, ref, shape, c0, training=training, channels_last=channels_last
    ):
        assert_rel_close(out_fast, out_ref, tol, f"output, step {step}")
        assert_rel_close(dx_fast, dx_ref, tol, f"input grad, step {step}")
    # Gradients accumulated over the steps, running statistics and num_batches_tracked after them.
    assert_same_grads_and_buffers(fast, ref, tol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
def test_block_row_chunks_match(monkeypatch, training, memory_efficient):
    """The torch backend's row-chunked norm1 steps (large inputs on the CPU) give the same result when
    they take many chunks."""
    monkeypatch.setitem(torch_ops.CHUNK_ELEMENTS, "cpu", 40)
    ref, fast = block_pair(3, 5, 2, 3, memory_efficient=memory_efficient)
    tol = TOLERANCE[torch.float64]
    for _, out_fast, out_ref, dx_fast, dx_ref in run_steps(
        fast, ref, (2, 5, 7), 5, training=training, channels_last=False, steps=2
    ):
        assert_rel_close(out_fast, out_ref, tol, "output")
        assert_rel_close(dx_fast, dx_ref, tol, "input grad")
    assert_same_grads_and_buffers(fast, ref, tol)


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_stats_momentum_variants(momentum):
    """momentum=None (cumulative average) and a custom momentum update exactly as nn.BatchNorm2d."""
    ref, fast = block_pair(3, 4, 2, 3)
    for model in (ref, fast):
        for i, layer in enumerate(model.values()):
            layer.norm1.momentum = momentum
            layer.norm2.momentum = None if momentum is None else momentum / (i + 1)
    for _ in run_steps(fast, ref, (2, 5, 6), 4, training=True, channels_last=False, steps=4):
        pass
    assert_same_grads_and_buffers(fast, ref, TOLERANCE[torch.float64])


def test_running_stats_updated_once_per_forward_with_memory_efficient():
    """torchvision's checkpointing updates running stats twice (pytorch#96136); fastdense once."""
    ref, fast = block_pair(2, 4, 2, 3, memory_efficient=True)  # ref is memory_efficient=False
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    fast.train()
    ref.train()
    fast(x).sum().backward()
    ref(x).sum().backward()
    for layer in fast.values():
        assert int(layer.norm1.num_batches_tracked) == 1
        assert int(layer.norm2.num_batches_tracked) == 1
    assert_same_grads_and_buffers(fast, ref, TOLERANCE[torch.float64])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_frozen_parameters_and_input_without_grad(training):
    """Only what requires grad gets a gradient: frozen layers, or an input that needs none."""
    ref, fast = block_pair(3, 4, 2, 3)
    for model in (ref, fast):
        model.train(training)
        model.denselayer2.requires_grad_(False)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    fast(x).square().sum().backward()
    ref(x).square().sum().backward()
    for name, param in fast.named_parameters():
        if name.startswith("denselayer2."):
            assert param.grad is None
        else:
            assert_rel_close(param.grad, ref.get_parameter(name).grad, TOLERANCE[torch.float64], name)

    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    for model in (ref, fast):
        model.requires_grad_(False)
    fast(x_fast).square().sum().backward()
    ref(x_ref).square().sum().backward()
    assert_rel_close(x_fast.grad, x_ref.grad, TOLERANCE[torch.float64], "input grad with frozen block")


def test_no_grad_and_inference_mode_match():
    ref, fast = block_pair(3, 4, 2, 3)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    for training in (True, False):
        fast.train(training)
        ref.train(training)
        for context in (torch.no_grad, torch.inference_mode):
            with context():
                out_fast, out_ref = fast(x), ref(x)
            assert not out_fast.requires_grad
            assert_rel_close(out_fast, out_ref, TOLERANCE[torch.float64], f"{context.__name__} output")
    assert_same_grads_and_buffers_after_no_grad(fast, ref)


def assert_same_grads_and_buffers_after_no_grad(fast, ref):
    ref_buffers = dict(ref.named_buffers())
    for name, buf in fast.named_buffers():
        if buf.is_floating_point():
            assert_rel_close(buf, ref_buffers[name], TOLERANCE[torch.float64], name)
        else:
            assert torch.equal(buf, ref_buffers[name]), name


def test_output_is_channels_last_buffer_with_input_in_front():
    _, fast = block_pair(2, 3, 2, 2)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = fast(x)
    assert out.shape == (2, 3 + 2 * 2, 4, 5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[:, :3], x)


def test_retain_graph_double_backward_call():
    """backward twice with retain_graph gives twice the gradient, like torchvision."""
    ref, fast = block_pair(2, 3, 2, 2)
    x_fast = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x_fast.detach().clone().requires_grad_()
    out_fast, out_ref = fast(x_fast).sum(), ref(x_ref).sum()
    for _ in range(2):
        out_fast.backward(retain_graph=True)
        out_ref.backward(retain_graph=True)
    assert_rel_close(x_fast.grad, x_ref.grad, TOLERANCE[torch.float64], "input grad")
    assert_same_grads_and_buffers(fast, ref, TOLERANCE[torch.float64])


def test_standalone_layer_matches_torchvision_layer():
    """A FastDenseLayer called on its own (outside a block) computes what torchvision's layer does."""
    ref, fast = block_pair(2, 3, 2, 2)
    x = [torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)]
    for training in (True, False):
        ref.train(training)
        fast.train(training)
        assert_rel_close(fast.denselayer2(x), ref.denselayer2(x), TOLERANCE[torch.float64], "list input")
        assert_rel_close(fast.denselayer1(x[0]), ref.denselayer1(x[0]), TOLERANCE[torch.float64], "tensor input")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_with_a_gpus_operator_choices_matches(training):
    """The torch backend's operator choices for a GPU (``counted_as("cuda")``: one-reduction statistics,
    large row chunks), run here on CPU tensors in float32, against torchvision."""
    ref, fast = block_pair(3, 5, 2, 3, dtype=torch.float32)
    tol = TOLERANCE[torch.float32]
    with counted_as("cuda"):
        for _, out_fast, out_ref, dx_fast, dx_ref in run_steps(
            fast, ref, (2, 5, 7), 5, training=training, channels_last=True, steps=2, dtype=torch.float32
        ):
            assert_rel_close(out_fast, out_ref, tol, "output")
            assert_rel_close(dx_fast, dx_ref, tol, "input grad")
    assert_same_grads_and_buffers(fast, ref, tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_column_stats_with_a_gpus_choices_are_float32_accurate(dtype):
    """A GPU's column statistics of half-precision columns are float32-accurate (Welford's, not the sums of
    x and x^2, which lose mean^2/var ulps: the column of mean 20 and deviation 0.5), and exactly 0 for a
    constant column."""
    generator = torch.Generator().manual_seed(3)
    cols = (torch.randn(4096, 6, generator=generator) * 0.5 + torch.tensor([0, 3, -8, 20, 1, 0])).to(dtype)
    cols[:, 5] = 7.0
    with counted_as("cuda"):
        var, mean = torch_ops.column_stats(cols)
    ref_var, ref_mean = torch.var_mean(cols.double(), dim=0, correction=0)
    assert var.dtype == mean.dtype == torch.float32
    assert torch.allclose(mean.double(), ref_mean, rtol=1e-6, atol=1e-6), (mean, ref_mean)
    assert torch.allclose(var.double(), ref_var, rtol=2e-5, atol=0), (var, ref_var)


def test_a_3d_block_on_the_cpu_keeps_the_bottlenecks_its_buffer_holds():
    """memory_efficient=False keeps every layer's bottleneck, except in 3-D on the CPU: the last layers',
    as many as fit in the buffer's size; the rest are recomputed (exactness: test_monai, test_volumes)."""
    from fastdense.block_algorithm import kept_bottleneck_layers

    assert kept_bottleneck_layers(6, 256, 128, "cpu", 3) == range(4, 6)
    assert kept_bottleneck_layers(6, 256, 128, "cpu", 2) == kept_bottleneck_layers(6, 256, 128, "cuda", 3) == range(6)
    block = fastdense.FastDenseBlock(6, 8, 2, 4, spatial_dims=3).double()  # buffer 32 channels, bottlenecks 8
    x = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        block(x)
    assert shapes.count((2 * 3 * 4 * 5, 8)) == 4
