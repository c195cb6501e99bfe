"""FastDenseNet and the constructors against torchvision's DenseNet: structure, state_dicts, numerics."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fastdense
from fastdense.tools.verify import compare, randomize_batchnorm

from .helpers import TOLERANCE, assert_rel_close

SMALL = {"growth_rate": 4, "block_config": (2, 3, 2), "num_init_features": 8, "bn_size": 2, "num_classes": 5}


def network_pair(dtype=torch.float64, seed=0, **kwargs):
    config = SMALL | kwargs
    memory_efficient = config.pop("memory_efficient", False)
    backend = config.pop("backend", "auto")
    torch.manual_seed(seed)
    ref = torchvision.models.DenseNet(**config)
    randomize_batchnorm(ref, torch.Generator().manual_seed(seed + 1))
    fast = fastdense.FastDenseNet(**config, memory_efficient=memory_efficient, backend=backend)
    fast.load_state_dict(ref.state_dict())
    return ref.to(dtype), fast.to(dtype)


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_state_dict_keys_order_and_strict_loading_both_ways(name):
    ref = getattr(torchvision.models, name)()
    fast = getattr(fastdense, name)()
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in ref.parameters())
    for param, ref_param in zip(fast.parameters(), ref.parameters(), strict=True):
        assert param.shape == ref_param.shape
    randomize_batchnorm(ref)
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fast.state_dict(), strict=True)
    for (key, value), ref_value in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(value, ref_value), key


def test_densenet264_is_the_paper_configuration():
    fast = fastdense.densenet264(num_classes=10)
    ref = torchvision.models.DenseNet(32, (6, 12, 64, 48), 64, num_classes=10)
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="densenet264 has no pretrained weights"):
        fastdense.densenet264(weights="DEFAULT")


def test_constructors_pass_keyword_arguments():
    model = fastdense.densenet121(num_classes=7, drop_rate=0.2, memory_efficient=True, backend="torch")
    assert model.classifier.out_features == 7
    blocks = model.dense_blocks()
    assert [len(b) for b in blocks] == [6, 12, 24, 16]
    assert all(b.memory_efficient and b.backend == "torch" for b in blocks)
    assert all(layer.drop_rate == 0.2 for b in blocks for layer in b.values())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_network_matches_torchvision_float64(training, memory_efficient, channels_last):
    ref, fast = network_pair(memory_efficient=memory_efficient)
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 3, 37, 29, generator=generator, dtype=torch.float64) for _ in range(3)]
    if channels_last:
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    errors = compare(fast, ref, inputs, training)
    assert errors["num_batches_tracked"] == 0.0
    for key in ("output", "input_grad", "param_grad", "running_stats"):
        assert errors[key] <= TOLERANCE[torch.float64], (key, errors)


def test_compare_detects_a_wrong_weight():
    """The verification used above and in the report can fail: a perturbed weight shows up."""
    ref, fast = network_pair()
    with torch.no_grad():
        fast.features.denseblock2.denselayer2.conv1.weight[0, 0] += 1e-3
    errors = compare(fast, ref, [torch.randn(2, 3, 32, 32, dtype=torch.float64)], training=True)
    assert errors["output"] > 1e-7
    assert errors["param_grad"] > 1e-7


def test_batch_of_one_with_spatial_extent_trains():
    ref, fast = network_pair()
    errors = compare(fast, ref, [torch.randn(1, 3, 40, 40, dtype=torch.float64)], training=True)
    assert max(errors.values()) <= TOLERANCE[torch.float64], errors


def test_sgd_training_tracks_torchvision():
    """Several SGD steps (momentum, weight decay) on the same batches: the weights stay together."""
    ref, fast = network_pair()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(5)
    ref.train()
    fast.train()
    for step in range(6):
        x = torch.randn(4, 3, 33, 33, generator=generator, dtype=torch.float64)
        target = torch.randint(0, 5, (4,), generator=generator)
        for model, opt in ((ref, opt_ref), (fast, opt_fast)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
        for (name, param), ref_param in zip(fast.named_parameters(), ref.parameters(), strict=True):
            assert_rel_close(param, ref_param, TOLERANCE[torch.float64], f"{name} after step {step}")
    for (name, buf), ref_buf in zip(fast.named_buffers(), ref.buffers(), strict=True):
        assert_rel_close(buf, ref_buf, TOLERANCE[torch.float64], name)


@pytest.mark.parametrize("momentum", [None, 0.3], ids=["cumulative", "momentum-0.3"])
def test_every_batchnorms_momentum_variant_tracks_torchvision(momentum):
    """The stem's norm0 takes PyTorch's BatchNorm (with its running statistics) for a numeric momentum and
    fastdense's update for the cumulative average; either way, and for every other BatchNorm, three training
    steps leave the running statistics and num_batches_tracked as torchvision's, and the gradients match."""
    ref, fast = network_pair()
    for model in (ref, fast):
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = momentum
    inputs = [torch.randn(3, 3, 32, 32, dtype=torch.float64) for _ in range(3)]
    errors = compare(fast, ref, inputs, training=True)
    assert max(errors.values()) <= TOLERANCE[torch.float64], errors
    assert int(fast.features.norm0.num_batches_tracked) == int(ref.features.norm0.num_batches_tracked) == 3


def test_replaced_stem_and_transition_modules_are_respected():
    """Users swap pool0 for Identity (small medical images) or change a transition's pool: the fused
    stem and pool-first transition step aside and the model still matches torchvision."""
    ref, fast = network_pair()
    for model in (ref, fast):
        model.features.pool0 = nn.Identity()
        model.features.transition1.pool = nn.MaxPool2d(2)
    errors = compare(fast, ref, [torch.randn(2, 3, 20, 20, dtype=torch.float64)], training=True)
    assert max(errors.values()) <= TOLERANCE[torch.float64], errors


def test_backend_property_and_repr():
    model = fastdense.FastDenseNet(**SMALL, backend="torch")
    assert model.backend == "torch"
    assert model.active_backend is None
    model(torch.randn(2, 3, 32, 32))
    assert model.active_backend == "torch"
    assert "backend='torch'" in repr(model) and "active_backend='torch'" in repr(model)
    model.backend = "auto"
    assert all(block.backend == "auto" for block in model.dense_blocks())
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda"


def _saved_shapes(model, x):
    """The shapes of every tensor autograd saves in a training forward of ``model`` on ``x``."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return shapes


@pytest.mark.parametrize("recompute", [False, True], ids=["keeps-conv0", "recomputes-conv0"])
def test_the_stem_keeps_conv0s_output_at_most_once_and_never_its_normalised_copy(monkeypatch, recompute):
    """torchvision saves three tensors of conv0's output shape (conv0's output for norm0, the ReLU's output
    for the ReLU and for the max pool). The fused stem keeps conv0's output once, for norm0's backward (a
    2-D stem on the CPU), or computes it again in backward (on a GPU and for volumes: ``recomputes_conv0``,
    forced here), and never the normalised copy; both ways match torchvision, every gradient and running
    statistic."""
    monkeypatch.setattr(fastdense.densenet, "recomputes_conv0", lambda x: recompute)
    ref, fast = network_pair()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    conv0_out = (2, SMALL["num_init_features"], 16, 16)
    assert _saved_shapes(ref.train(), x).count(conv0_out) == 3
    assert _saved_shapes(fast.train(), x).count(conv0_out) == (0 if recompute else 1)
    errors = compare(fast, ref, [x, torch.randn_like(x)], training=True)
    assert max(errors.values()) <= TOLERANCE[torch.float64], errors


def test_a_2d_stem_recomputes_conv0_only_off_the_cpu():
    image, volume = torch.empty(1, 3, 8, 8), torch.empty(1, 1, 8, 8, 8)
    assert not fastdense.densenet.recomputes_conv0(image)
    assert fastdense.densenet.recomputes_conv0(volume)
    assert fastdense.densenet.recomputes_conv0(torch.empty(1, 3, 8, 8, device="meta"))


@pytest.mark.parametrize("input_grad", [False, True], ids=["input", "input-grad"])
def test_a_frozen_conv0_gets_no_gradient_and_the_rest_torchvisions(input_grad):
    """Fine-tuning with a frozen stem convolution, with and without an input gradient."""
    ref, fast = network_pair()
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    grads = []
    for model in (ref, fast):
        model.train().features.conv0.weight.requires_grad_(False)
        x_in = x.clone().requires_grad_(input_grad)
        model(x_in).square().sum().backward()
        grads.append([x_in.grad] + [p.grad for p in model.parameters()])
    assert fast.features.conv0.weight.grad is None
    for ref_grad, fast_grad in zip(*grads, strict=True):
        assert (ref_grad is None) == (fast_grad is None)
        if ref_grad is not None:
            assert_rel_close(fast_grad, ref_grad, TOLERANCE[torch.float64])
