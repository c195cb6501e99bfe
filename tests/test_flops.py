"""FLOP counts of fastdense models by PyTorch's ``FlopCounterMode`` (what torchvision's ``_ops`` metadata and
training frameworks count), module by module against the same network built of torchvision's or MONAI's
modules: forward and backward, training and eval, 2-D and 3-D, ``memory_efficient`` both ways.

The counts agree where the computation is the same and differ by exactly what fastdense does differently:

* a dense block counts what the peer's counts (its registered operators carry formulas: ``fastdense.flops``);
* with ``memory_efficient=True`` its backward also counts the 1x1 convolutions it computes again; the
  peers' checkpointed recompute runs where the counter does not see it, so theirs counts none;
* a transition pools before its 1x1 convolution: a quarter of the peer's FLOPs in 2-D (an eighth in 3-D);
* a 3-D stem computes conv0 again in backward instead of keeping its output: one more conv0 forward.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.densenet import DenseNet121_Weights

import fastdense


def flops_by_module(model, x, backward: bool) -> dict[str, int]:
    """Total FLOPs per module path (the counter's own names, the root class dropped), plus "" for all."""
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.float().sum().backward()
    counts = defaultdict(int)
    for name, by_op in counter.get_flop_counts().items():
        if name == "Global" or "." in name:  # (the root module's name counts what Global counts)
            counts["" if name == "Global" else name.partition(".")[2]] += sum(by_op.values())
    return counts


def conv1_flops(block, pixels: int, layers=None) -> int:
    """The forward FLOPs of the 1x1 convolutions of a block's ``layers`` (default: all), at ``pixels`` pixels."""
    chosen = list(block.values()) if layers is None else [list(block.values())[i] for i in layers]
    return sum(2 * pixels * layer.conv1.in_channels * layer.conv1.out_channels for layer in chosen)


def recomputed_layers(block) -> list[int]:
    """The layers whose bottleneck a CPU backward computes again: every one with ``memory_efficient``,
    else those a 3-D block on the CPU does not keep (``block_algorithm.kept_bottleneck_layers``)."""
    from fastdense.block_algorithm import kept_bottleneck_layers

    if block.memory_efficient:
        return list(range(len(block)))
    c_total = block.num_input_features + len(block) * block.growth_rate
    kept = kept_bottleneck_layers(len(block), c_total, block.bn_size * block.growth_rate, "cpu", block.spatial_dims)
    return [i for i in range(len(block)) if i not in kept]


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("source", ["fastdense", "converted"])
def test_densenet121_counts_what_torchvision_counts(source, training, memory_efficient):
    torch.manual_seed(0)
    ref = torchvision.models.densenet121(memory_efficient=memory_efficient).train(training)
    fast = (
        fastdense.convert(copy.deepcopy(ref))
        if source == "converted"
        else fastdense.densenet121(memory_efficient=memory_efficient).train(training)
    )
    x = torch.randn(1, 3, 64, 64)
    for backward in (False, True):
        tv, fd = flops_by_module(ref, x, backward), flops_by_module(fast, x, backward)
        expected_total = tv[""]
        side = 16  # denseblock1's resolution at a 64x64 input
        for i in range(1, 5):
            name, block = f"features.denseblock{i}", getattr(fast.features, f"denseblock{i}")
            recompute = conv1_flops(block, side**2, recomputed_layers(block)) if backward else 0
            assert fd[name] == tv[name] + recompute, (name, backward)
            expected_total += recompute
            side //= 2
        for i in range(1, 4):  # built or converted, fastdense's transitions pool before their 1x1 conv
            transition = f"features.transition{i}"
            assert fd[transition] * 4 == tv[transition], (transition, backward)
            expected_total -= tv[transition] * 3 // 4
        assert fd[""] == expected_total, (backward, fd[""], tv[""])


def test_the_weights_metadata_ops_and_what_fastdense_counts():
    """torchvision's ``_ops`` (GMACs at 224x224, its FLOP count halved) for densenet121, and fastdense's
    count: the same less three quarters of the transitions' convolutions."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tv = flops_by_module(torchvision.models.densenet121().eval(), x, backward=False)
        fd = flops_by_module(fastdense.densenet121().eval(), x, backward=False)
    assert round(tv[""] / 2 / 1e9, 3) == DenseNet121_Weights.DEFAULT.meta["_ops"]
    transitions = sum(tv[f"features.transition{i}"] for i in range(1, 4))
    assert fd[""] == tv[""] - transitions * 3 // 4
    assert sum(fd[f"features.denseblock{i}"] for i in range(1, 5)) == sum(
        tv[f"features.denseblock{i}"] for i in range(1, 5)
    )


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_converted_monai_densenet_counts_what_monai_counts(spatial_dims, training, memory_efficient):
    from monai.networks.nets import DenseNet

    torch.manual_seed(0)
    original = DenseNet(spatial_dims, 1, 3, init_features=8, growth_rate=4, block_config=(2, 3), bn_size=2)
    original.train(training)
    converted = fastdense.convert(copy.deepcopy(original), strict=True)
    for block in converted.modules():
        if isinstance(block, fastdense.FastDenseBlock):
            block.memory_efficient = memory_efficient
    edge = 16
    x = torch.randn(2, 1, *[edge] * spatial_dims)
    pool = 2**spatial_dims
    for backward in (False, True):
        monai, fd = flops_by_module(original, x, backward), flops_by_module(converted, x, backward)
        expected = monai[""] - monai["features.transition1"] * (pool - 1) // pool
        assert fd["features.transition1"] * pool == monai["features.transition1"]
        pixels = [(edge // 4) ** spatial_dims, (edge // 8) ** spatial_dims]  # the blocks' resolutions
        for i, block_pixels in enumerate(pixels, start=1):
            name, block = f"features.denseblock{i}", getattr(converted.features, f"denseblock{i}")
            recompute = conv1_flops(block, x.shape[0] * block_pixels, recomputed_layers(block)) if backward else 0
            assert fd[name] == monai[name] + recompute, (name, backward)
            expected += recompute
        if backward and spatial_dims == 3:  # a 3-D stem computes conv0 again instead of keeping it
            conv0 = converted.features.conv0
            expected += 2 * x.shape[0] * math.prod(x.shape[2:]) // 8 * conv0.in_channels * conv0.out_channels * 7**3
        assert fd[""] == expected, (backward, fd[""], monai[""])
