"""``revert``: the inverse of ``convert``, back to the original library's modules.

A block ``convert`` made goes back to the very block it replaced (torchvision's ``_DenseBlock``, timm's
``DenseBlock`` or MONAI's ``_DenseBlock``, kept aside by ``convert``), its layers pointed again at the
fast block's current modules. A ``FastDenseNet`` becomes torchvision's ``DenseNet`` and a block fastdense
built itself a torchvision ``_DenseBlock``. Either way every parameter and buffer is the very same
object and the state_dict keys are unchanged, so an optimizer keeps working and checkpoints load both
ways. The reverted model runs the original library's code: TorchScript, ONNX's legacy exporter and
anything else that needs plain modules take it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.densenet import DenseNet, _DenseBlock, _Transition

from .block import FastDenseBlock
from .densenet import FastDenseNet, Features, Transition

# convert keeps the block it replaced under this attribute of the new block (in ``__dict__``, so it is
# neither a submodule nor in the state_dict; it shares every parameter-holding module with the fast block).
ORIGINAL = "_fastdense_original"
_LAYER_PARTS = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")


def revert(module: nn.Module) -> nn.Module:
    """Replace every fastdense module in ``module`` by the original library's, in place; returns
    ``module``, or the replacement when ``module`` itself is a fastdense model or block."""
    replacement = _reverted(module)
    if replacement is not None:  # its subtree is reverted with it
        return replacement
    for name, child in list(module.named_children()):
        new = revert(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _reverted(module: nn.Module) -> nn.Module | None:
    if isinstance(module, FastDenseNet):
        return _torchvision_densenet(module)
    if isinstance(module, FastDenseBlock):
        original = module.__dict__.get(ORIGINAL)
        return _restored(original, module) if original is not None else _torchvision_block(module)
    if isinstance(module, (Transition, Features)):
        original = module.__dict__.get(ORIGINAL)
        if original is not None:  # the containers convert replaced: their children again, reverted
            for name, child in module.named_children():
                setattr(original, name, revert(child))
            return original.train(module.training)
    if isinstance(module, Transition):
        return _torchvision_transition(module)
    if isinstance(module, Features):
        return nn.Sequential(OrderedDict((name, revert(child)) for name, child in module.named_children()))
    return None


def _restored(original: nn.Module, fast: FastDenseBlock) -> nn.Module:
    """The block ``convert`` replaced, its layers holding the fast block's current modules again."""
    for old, new in zip(original.children(), fast.values(), strict=True):
        if "layers" in old._modules:  # MONAI: the layer's own Sequential went over whole
            old.layers = new.layers
        else:
            for part in _LAYER_PARTS:
                if part in old._modules:  # timm's layers have no ReLU modules (BatchNormAct2d applies it)
                    setattr(old, part, getattr(new, part))
            old.drop_rate = new.drop_rate
            for flag in ("memory_efficient", "grad_checkpointing"):
                if hasattr(old, flag):
                    setattr(old, flag, new.memory_efficient)
    return original.train(fast.training)


def _torchvision_block(fast: FastDenseBlock) -> _DenseBlock:
    """torchvision's ``_DenseBlock`` holding the fast block's modules (its forward is rank-agnostic, so a
    3-D block works too)."""
    if any(layer.channelwise_dropout for layer in fast.values()):
        raise ValueError(
            "fastdense.revert: this FastDenseBlock drops whole channels (MONAI's dropout), which torchvision's "
            "_DenseBlock does not; revert the MONAI model it was converted from instead"
        )
    layers = list(fast.values())
    with torch.device("meta"):  # the modules are replaced below: no memory for throwaway weights
        block = _DenseBlock(len(layers), fast.num_input_features, fast.bn_size, fast.growth_rate, 0.0)
    for old, new in zip(block.values(), layers, strict=True):
        for part in _LAYER_PARTS:
            setattr(old, part, getattr(new, part))
        old.drop_rate, old.memory_efficient = float(new.drop_rate), fast.memory_efficient
    return block.train(fast.training)


def _torchvision_transition(fast: Transition) -> _Transition:
    with torch.device("meta"):
        transition = _Transition(fast.norm.num_features, fast.conv.out_channels)
    for name, child in fast.named_children():
        setattr(transition, name, child)
    return transition.train(fast.training)


def _torchvision_densenet(fast: FastDenseNet) -> DenseNet:
    blocks = fast.dense_blocks()
    with torch.device("meta"):
        net = DenseNet(
            growth_rate=blocks[0].growth_rate,
            block_config=tuple(len(block) for block in blocks),
            num_init_features=fast.features.conv0.out_channels,
            bn_size=blocks[0].bn_size,
            num_classes=fast.classifier.out_features,
            memory_efficient=blocks[0].memory_efficient,
        )
    net.features = _reverted(fast.features)
    net.classifier = fast.classifier
    return net.train(fast.training)
