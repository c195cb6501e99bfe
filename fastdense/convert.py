"""``convert``: swap torchvision's and timm's dense blocks inside an existing model for ``FastDenseBlock``s.

The converted blocks hold the very same parameter and buffer objects (an optimizer built before the
conversion keeps working) under the same names, so ``state_dict()`` keys and order are unchanged.
timm's layers normalise with ``BatchNormAct2d`` (BatchNorm and activation in one module); a block is
converted when that activation is a ReLU. timm is never imported: its classes are recognised by name.
"""

from __future__ import annotations

import warnings

from torch import nn
from torchvision.models.densenet import _DenseBlock, _DenseLayer

from .backend import check_backend_name
from .block import FastDenseBlock


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules())


def _standard_bn(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats


def _timm_class(module: nn.Module, name: str) -> bool:
    """Whether ``module`` is exactly timm's class ``name`` (matched by name: timm is optional)."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("timm.")


def is_dense_block(module: nn.Module) -> bool:
    """A dense block ``convert`` knows: torchvision's ``_DenseBlock`` or timm's ``DenseBlock``."""
    return isinstance(module, _DenseBlock) or _timm_class(module, "DenseBlock")


def _timm_norm_act(norm: nn.Module) -> bool:
    """timm's BatchNormAct2d computing relu(batch_norm(x)): affine, running statistics, plain ReLU."""
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    return (
        _timm_class(norm, "BatchNormAct2d")
        and norm.affine
        and norm.track_running_stats
        and type(act) is nn.ReLU
        and type(drop) is nn.Identity
        and not hasattr(norm, "aa")
    )


def _why_not_exact_layers(block: nn.Module) -> str | None:
    """The layer classes and their activations: torchvision's or timm's, unmodified."""
    timm = _timm_class(block, "DenseBlock")
    if not timm and type(block).forward is not _DenseBlock.forward:
        return "its class overrides forward"
    layers = list(block.values())
    if not layers:
        return "it has no layers"
    for i, layer in enumerate(layers):
        name = f"denselayer{i + 1}"
        if timm:
            if not _timm_class(layer, "DenseLayer"):
                return f"{name} is a {type(layer).__name__}, not timm's DenseLayer"
            if not (_timm_norm_act(layer.norm1) and _timm_norm_act(layer.norm2)):
                return f"{name} normalises with something other than BatchNorm2d followed by ReLU"
            continue
        if not isinstance(layer, _DenseLayer) or type(layer).forward is not _DenseLayer.forward:
            return f"{name} is a {type(layer).__name__}, not torchvision's _DenseLayer"
        if type(layer).bn_function is not _DenseLayer.bn_function:
            return f"{name} overrides bn_function"
        if not (type(layer.relu1) is nn.ReLU and type(layer.relu2) is nn.ReLU):
            return f"{name} uses an activation other than ReLU"
    return None


def _why_not_exact(block: nn.Module) -> str | None:
    """None when ``FastDenseBlock`` reproduces ``block`` exactly, else the reason it would not."""
    reason = _why_not_exact_layers(block)
    if reason is not None:
        return reason
    layers = list(block.values())
    c0, growth = layers[0].norm1.num_features, layers[0].conv2.out_channels
    for i, layer in enumerate(layers):
        name = f"denselayer{i + 1}"
        if any(isinstance(norm, nn.SyncBatchNorm) for norm in (layer.norm1, layer.norm2)):
            return f"{name} uses SyncBatchNorm (statistics across processes), which fastdense does not support yet"
        standard = _standard_bn if isinstance(block, _DenseBlock) else _timm_norm_act
        if not (standard(layer.norm1) and standard(layer.norm2)):
            return f"{name} uses a normalisation other than an affine BatchNorm2d with running statistics"
        c1, c2 = layer.conv1, layer.conv2
        if not (type(c1) is nn.Conv2d and type(c2) is nn.Conv2d):
            return f"{name} uses a convolution other than nn.Conv2d"
        if (c1.kernel_size, c1.stride, c1.padding, c1.dilation, c1.groups) != ((1, 1), (1, 1), (0, 0), (1, 1), 1):
            return f"{name}.conv1 is not a plain 1x1 convolution"
        if (c2.kernel_size, c2.stride, c2.padding, c2.dilation, c2.groups) != ((3, 3), (1, 1), (1, 1), (1, 1), 1):
            return f"{name}.conv2 is not a plain 3x3 convolution with padding 1"
        if c1.bias is not None or c2.bias is not None or c1.padding_mode != "zeros" or c2.padding_mode != "zeros":
            return f"{name} has a convolution with a bias or non-zero padding mode"
        if c1.in_channels != c0 + i * growth or c2.out_channels != growth or c2.in_channels != c1.out_channels:
            return f"{name} does not follow the block's channel growth"
        if c1.out_channels % growth:
            return f"{name}.conv1's output channels are not a multiple of the growth rate"
        if layer.norm1.num_features != c1.in_channels or layer.norm2.num_features != c1.out_channels:
            return f"{name}'s norms do not match its convolutions' channels"
        if layer.norm1.eps != layers[0].norm1.eps:
            return "its norm1 layers use different eps (batch statistics are shared)"
    if _has_hooks(block):
        return "it or one of its layers has hooks registered (the fast block does not call its layers)"
    return None


def _memory_efficient(layer: nn.Module) -> bool:
    return bool(getattr(layer, "memory_efficient", False) or getattr(layer, "grad_checkpointing", False))


def _fast_block(block: nn.Module, backend: str) -> FastDenseBlock:
    layers = list(block.values())
    growth = layers[0].conv2.out_channels
    fast = FastDenseBlock(
        num_layers=len(layers),
        num_input_features=layers[0].norm1.num_features,
        bn_size=layers[0].conv1.out_channels // growth,
        growth_rate=growth,
        memory_efficient=any(_memory_efficient(layer) for layer in layers),
        backend=backend,
    )
    # Hand the original modules over, so parameters and buffers stay the very same objects. timm's
    # layers have no ReLU modules (BatchNormAct2d applies it): the fast layers keep their own, stateless.
    for new, old in zip(fast.values(), layers, strict=True):
        for child in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
            if hasattr(old, child):
                setattr(new, child, getattr(old, child))
        new.drop_rate, new.memory_efficient = old.drop_rate, _memory_efficient(old)
    return fast.train(block.training)


def convert(module: nn.Module, *, backend: str = "auto", strict: bool = False) -> nn.Module:
    """Replace every torchvision ``_DenseBlock`` and timm ``DenseBlock`` in ``module`` by an equivalent
    ``FastDenseBlock``.

    Works on a whole DenseNet, any model containing dense blocks, or a single block (then the new block
    is returned). Blocks that cannot be reproduced exactly are left alone with a ``UserWarning`` that
    names them and says why, or, with ``strict=True``, make it raise a ``ValueError`` before anything
    is changed. Returns ``module`` (modified in place) or the new block.
    """
    check_backend_name(backend)
    if is_dense_block(module):
        reason = _why_not_exact(module)
        if reason is None:
            return _fast_block(module, backend)
        _refuse(f"left the dense block unchanged: {reason}", strict)
        return module
    found = [
        (parent, child_name, f"{name}.{child_name}" if name else child_name, grandchild)
        for name, parent in module.named_modules()
        for child_name, grandchild in parent.named_children()
        if is_dense_block(grandchild)
    ]
    reasons = {full_name: _why_not_exact(block) for _, _, full_name, block in found}
    if strict and any(reasons.values()):
        problems = "; ".join(f"{name!r}: {reason}" for name, reason in reasons.items() if reason)
        raise ValueError(f"fastdense.convert(strict=True): cannot reproduce every dense block exactly: {problems}")
    for parent, child_name, full_name, block in found:
        if reasons[full_name] is None:
            setattr(parent, child_name, _fast_block(block, backend))
        else:
            _refuse(f"left {full_name!r} unchanged: {reasons[full_name]}", strict)
    return module


def _refuse(message: str, strict: bool) -> None:
    if strict:
        raise ValueError(f"fastdense.convert(strict=True): {message}")
    warnings.warn(f"fastdense.convert: {message}", stacklevel=3)
