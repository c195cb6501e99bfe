"""FastDenseBlock against torchvision's _DenseBlock in float64: outputs, every gradient, running stats."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastdense
from fastdense import torch_ops
from fastdense.batchnorm import NormMap, affine
from fastdense.devices import counted_as
from fastdense.tools.verify import relative_error

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


def assert_steps_match(fast, ref, shape, c0, *, training, channels_last, steps=2, dtype=torch.float64):
    """``run_steps`` with outputs and input gradients checked at each step, then every accumulated
    gradient and buffer, within the dtype's tolerance."""
    tol = TOLERANCE[dtype]
    for _, out_fast, out_ref, dx_fast, dx_ref in run_steps(
        fast, ref, shape, c0, training=training, channels_last=channels_last, steps=steps, dtype=dtype
    ):
        assert_rel_close(out_fast, out_ref, tol, "output")
        assert_rel_close(dx_fast, dx_ref, tol, "input grad")
    assert_same_grads_and_buffers(fast, ref, tol)


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
    assert_steps_match(fast, ref, (2, 5, 7), 5, training=training, channels_last=False)


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
    with counted_as("cuda"):
        assert_steps_match(fast, ref, (2, 5, 7), 5, training=training, channels_last=True, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_column_stats_with_a_gpus_choices_are_float32_accurate(dtype):
    """A GPU's column statistics of half-precision columns are float32-accurate (Welford's, not the sums of
    x and x^2, which lose mean^2/var ulps: the column of mean 20 and deviation 0.5), and exactly 0 for a
    constant column."""
    generator = torch.Generator().manual_seed(3)
    cols = (torch.randn(4096, 6, generator=generator) * 0.5 + torch.tensor([0, 3, -8, 20, 1, 0])).to(dtype)
    cols[:, 5] = 7.0
    with counted_as("cuda"):
        var, mean = torch_ops.column_var_mean(cols)
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


def _layer_norms(ratios_per_layer, dtype=torch.float64):
    """Per layer, (weight, bias) of a norm1 whose channel j has bias = ratio_j * |weight_j|."""
    generator = torch.Generator().manual_seed(5)
    norms = []
    for ratios in ratios_per_layer:
        weight = (torch.rand(len(ratios), generator=generator, dtype=torch.float64) + 0.5).to(dtype)
        norms.append((weight, torch.tensor(ratios, dtype=dtype) * weight.abs()))
    return norms


def test_norm1_sums_come_from_conv1s_weight_gradient_only_where_the_bias_allows():
    """Per layer: a channel whose bias exceeds the bound times its weight's magnitude (1 in half precision,
    4 in float32, 1024 in float64) sends the whole layer to the product-and-reduction path; negative biases
    never do; a zero weight with a non-positive bias (a dead channel) does not."""
    layers = [[0.0, 0.5, -0.3], [0.2, 1.5, 0.0], [-1e6, 0.9, 0.0], [2e3, 0.0, 0.0]]
    weights, biases = zip(*_layer_norms(layers), strict=True)
    weights[0][1] = biases[0][1] = 0.0  # (weight 0, bias 0: dead) in a serving layer
    expected = {
        torch.bfloat16: [True, False, True, False],
        torch.float16: [True, False, True, False],
        torch.float32: [True, True, True, False],
        torch.float64: [True, True, True, False],
    }
    for compute_dtype, serves in expected.items():
        assert torch_ops.norm1_weight_grad_serves(list(weights), list(biases), compute_dtype) == serves
    dead = [torch.zeros(2, dtype=torch.float64)], [torch.tensor([0.0, 1e-3], dtype=torch.float64)]
    assert torch_ops.norm1_weight_grad_serves(*dead, torch.float64) == [False]  # weight 0, bias above it
    with FakeTensorMode():  # the traffic counter's: counted as serving
        fake = [torch.empty(3)], [torch.empty(3)]
        assert torch_ops.norm1_weight_grad_serves(*fake, torch.bfloat16) == [True]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_matches_torchvision_on_both_norm1_sum_paths(monkeypatch, training):
    """A block whose layers take both paths of norm1's sums (from conv1's weight gradient, and the product
    and reduction), with zero, negative and dead norm1 channels, against torchvision in float64."""
    ref, fast = block_pair(4, 5, 2, 3)
    # layer 0: a zero weight and bias, a negative weight; layer 1: a dead channel (weight 0, bias < 0);
    # layer 2: a bias far above its weight (the product path); layer 3: as it is.
    edits = {0: [(0, 0.0, 0.0), (2, -0.7, 0.2)], 1: [(1, 0.0, -0.4)], 2: [(3, 1e-4, 0.5)]}
    for model in (ref, fast):
        for layer, channels in edits.items():
            norm1 = getattr(model, f"denselayer{layer + 1}").norm1
            with torch.no_grad():
                for channel, weight, bias in channels:
                    norm1.weight[channel], norm1.bias[channel] = weight, bias
    widths = []  # the prefix width of each layer that took its sums from conv1's weight gradient
    sum_p_xhat = torch_ops._sum_p_xhat
    monkeypatch.setattr(torch_ops, "_sum_p_xhat", lambda d_w1, *a: widths.append(d_w1.shape[1]) or sum_p_xhat(d_w1, *a))
    assert_steps_match(fast, ref, (2, 5, 7), 5, training=training, channels_last=True)
    assert widths == [14, 8, 5] * 2, widths  # layers 3, 1 and 0 of each step's backward; not layer 2 (width 11)


def test_norm1_weight_gradient_from_conv1s_in_bfloat16_is_within_a_few_times_torchvisions_error():
    """Operator level, bfloat16: norm1's weight gradient from conv1's weight gradient against float64 from
    the same rounded inputs and masks, beside PyTorch's BatchNorm backward on the rounded output gradient
    (torchvision's). At bias 0 within 2x its error, at the bound (bias = |weight|) within 3.5x (measured
    1.4x and 2.8x: the rounding of the recomputed activation, which the bias term enlarges)."""
    m, c, width = 20000, 96, 128
    for ratio, times in ((0.0, 2.0), (torch_ops.WEIGHT_GRAD_BIAS_BOUND[torch.bfloat16], 3.5)):
        ours, torchvisions = [], []
        for seed in range(4):
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(m, c, generator=generator, dtype=torch.float64).to(torch.bfloat16)
            d_y = torch.randn(m, width, generator=generator, dtype=torch.float64).to(torch.bfloat16)
            w1 = (torch.randn(width, c, generator=generator, dtype=torch.float64) / c**0.5).to(torch.bfloat16)
            weight = torch.rand(c, generator=generator, dtype=torch.float64) + 0.5
            var, mean = torch.var_mean(x.double(), dim=0, correction=0)
            rstd = (var + 1e-5).rsqrt()
            norm1 = NormMap(*(t.float() for t in (mean, rstd, weight, ratio * weight)))
            grad_sum = torch.zeros(m, c, dtype=torch.bfloat16)
            d_g1, _, _ = torch_ops.norm1_backward(d_y, x, norm1, w1, grad_sum, None, True, True)
            mask = torch_ops.normalized_relu(x, norm1.folded(), torch.bfloat16) > 0
            gold = ((d_y.double() @ w1.double()) * mask * (x.double() - mean) * rstd).sum(0)
            _, d_g1_tv, _ = torch.ops.aten.native_batch_norm_backward(
                torch.mm(d_y, w1) * mask, x, weight.float(), None, None, mean.float(), rstd.float(), True, 1e-5,
                [True, True, True],
            )  # fmt: skip
            ours.append(relative_error(d_g1, gold))
            torchvisions.append(relative_error(d_g1_tv, gold))
        assert sum(ours) <= times * sum(torchvisions), (ratio, ours, torchvisions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_norm2_statistics_and_activation_from_one_batchnorm_call(dtype):
    """Training's norm2 from PyTorch's BatchNorm: the activation is, bit for bit, what the backward
    recomputes with the folded map from the returned statistics (on the CPU), and the statistics are
    the columns' (float32, float64 for float64 data)."""
    generator = torch.Generator().manual_seed(4)
    y = (torch.randn(3000, 24, generator=generator, dtype=torch.float64) * 3 + 1).to(dtype)
    weight, bias = torch.rand(24, generator=generator) + 0.5, torch.rand(24, generator=generator) - 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    act, mean, rstd = torch_ops.norm2_relu_training(y, weight, bias, 1e-5)
    var = rstd.pow(-2) - 1e-5  # (as the block forms its variances: block_algorithm.variance_from_rstd)
    assert act.dtype == dtype and mean.dtype == rstd.dtype == acc
    norm2 = affine(weight.to(acc), bias.to(acc), mean, rstd)
    assert torch.equal(act, torch_ops.normalized_relu(y, norm2, dtype))
    ref_var, ref_mean = torch.var_mean(y.double(), dim=0, correction=0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(mean.double(), ref_mean, rtol=tol, atol=tol) and torch.allclose(
        var.double(), ref_var, rtol=tol
    )
