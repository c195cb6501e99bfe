"""fastdense.convert: torchvision models and blocks become fast ones with the same state and results."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.densenet import _DenseBlock

import fastdense
from fastdense.densenet import Features
from fastdense.tools.verify import compare, randomize_batchnorm

from .helpers import TOLERANCE, block_pair

SMALL = {"growth_rate": 4, "block_config": (2, 3), "num_init_features": 8, "bn_size": 2, "num_classes": 5}


def torchvision_pair(**kwargs):
    """A torchvision DenseNet with ``kwargs`` and an identical reference copy (same weights and BatchNorm
    state). The reference never uses memory_efficient=True: torchvision's checkpointing updates the
    running statistics twice per step (pytorch#96136), which fastdense does not reproduce."""
    torch.manual_seed(0)
    reference = randomize_batchnorm(torchvision.models.DenseNet(**(SMALL | kwargs | {"memory_efficient": False})))
    model = torchvision.models.DenseNet(**(SMALL | kwargs))
    model.load_state_dict(reference.state_dict())
    return reference.double(), model.double()


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_convert_densenet_keeps_state_and_results(memory_efficient):
    reference, model = torchvision_pair(memory_efficient=memory_efficient)
    keys = list(model.state_dict())
    params = {name: id(p) for name, p in model.named_parameters()}
    converted = fastdense.convert(model, backend="torch")
    assert converted is model
    blocks = [m for m in model.modules() if isinstance(m, fastdense.FastDenseBlock)]
    assert len(blocks) == 2 and not any(isinstance(m, _DenseBlock) for m in model.modules())
    assert all(b.backend == "torch" and b.memory_efficient == memory_efficient for b in blocks)
    # The stem and the transitions as the built model runs them (fused), under the same names.
    assert type(model.features) is Features and type(model.features.transition1) is fastdense.Transition
    assert list(model.state_dict()) == keys
    assert {name: id(p) for name, p in model.named_parameters()} == params  # same tensors: optimizers keep working
    reference.load_state_dict(model.state_dict())  # strict, both ways
    model.load_state_dict(reference.state_dict())
    for training in (True, False):
        errors = compare(model, reference, [torch.randn(2, 3, 30, 26, dtype=torch.float64)], training)
        assert max(errors.values()) <= TOLERANCE[torch.float64], errors


def test_convert_a_single_block_returns_the_fast_block():
    ref, _ = block_pair(3, 4, 2, 3)
    fast = fastdense.convert(ref)
    assert isinstance(fast, fastdense.FastDenseBlock)
    assert (fast.num_input_features, fast.growth_rate, fast.bn_size, len(fast)) == (4, 3, 2, 3)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert fast.denselayer2.conv1 is ref.denselayer2.conv1


def test_convert_nested_blocks_in_any_model():
    ref, _ = block_pair(2, 4, 2, 3)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(ref))
    fastdense.convert(model)
    assert isinstance(model[1][0], fastdense.FastDenseBlock)


def test_training_flag_and_drop_rate_carry_over():
    _, model = torchvision_pair(drop_rate=0.25)
    model.eval()
    fastdense.convert(model)
    block = model.features.denseblock1
    assert not block.training and not block.denselayer1.training
    assert all(layer.drop_rate == 0.25 for layer in block.values())


def test_blocks_that_cannot_be_reproduced_are_left_alone_with_a_warning():
    _, model = torchvision_pair()
    model.features.denseblock1.denselayer2.relu2 = nn.GELU()
    with pytest.warns(UserWarning) as record:
        fastdense.convert(model)
    messages = [str(w.message) for w in record]
    activation = "denselayer2 uses an activation other than ReLU"
    assert any("'features.denseblock1'" in m and activation in m for m in messages)
    assert isinstance(model.features.denseblock1, _DenseBlock)
    assert isinstance(model.features.denseblock2, fastdense.FastDenseBlock)


def test_a_block_with_a_hooked_layer_converts_and_its_hook_keeps_firing():
    """The fast block runs its layers one by one while a hook is on one of them (``fastdense.observed``)."""
    reference, model = torchvision_pair()
    seen = []
    model.features.denseblock2.denselayer1.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    fastdense.convert(model)
    assert isinstance(model.features.denseblock2, fastdense.FastDenseBlock)
    x = torch.randn(2, 3, 30, 26, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-9)
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda layer: setattr(layer, "norm1", nn.GroupNorm(1, layer.norm1.num_features)), "normalisation"),
        (lambda layer: setattr(layer.conv2, "padding_mode", "reflect"), "padding"),
        (lambda layer: setattr(layer.norm1, "eps", 1e-3), "different eps"),
        (lambda layer: setattr(layer, "conv1", nn.Conv2d(layer.conv1.in_channels, 4, 1, bias=True)), "bias"),
    ],
    ids=["groupnorm", "reflect-padding", "eps", "conv-bias"],
)
def test_unsupported_layer_variants_are_named(change, reason):
    ref, _ = block_pair(2, 4, 2, 3)
    change(ref.denselayer2)
    with pytest.warns(UserWarning, match=reason):
        assert fastdense.convert(ref) is ref


def test_convert_rejects_unknown_backend():
    _, model = torchvision_pair()
    with pytest.raises(ValueError, match="backend must be one of"):
        fastdense.convert(model, backend="cudnn")


def _densenet121(library: str) -> nn.Module:
    if library == "timm":
        import timm  # pinned in requirements.txt

        return timm.create_model("densenet121")
    return torchvision.models.densenet121()


@pytest.mark.parametrize("library", ["torchvision", "timm"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_converted_densenet121_counts_the_built_models_training_peak(library, backend):
    """convert swaps the stem and the transitions as well as the blocks, so a converted torchvision or timm
    model trains in the built model's memory (counted on fake tensors, batch 64, 224x224, bf16,
    channels_last); before the stem and transitions converted, 1.22x (torch) and 1.35x (triton) of it."""
    settings = {"autocast_dtype": torch.bfloat16, "channels_last": True}
    built = fastdense.estimate_peak_memory(fastdense.densenet121(backend=backend), (64, 3, 224, 224), **settings)
    converted_model = fastdense.convert(_densenet121(library), backend=backend)
    converted = fastdense.estimate_peak_memory(converted_model, (64, 3, 224, 224), **settings)
    reference = fastdense.estimate_peak_memory(_densenet121(library), (64, 3, 224, 224), **settings)
    assert abs(int(converted) / int(built) - 1) <= 0.05, (converted, built)
    assert int(converted) < 0.5 * int(reference), (converted, reference)
