"""``convert``: swap torchvision's, timm's and MONAI's dense blocks inside a model for ``FastDenseBlock``s.

The converted blocks hold the very same parameter and buffer objects (an optimizer built before the
conversion keeps working) under the same names, so ``state_dict()`` keys and order are unchanged.
timm's layers normalise with ``BatchNormAct2d`` (BatchNorm and activation in one module); a block is
converted when that activation is a ReLU. MONAI's blocks (1-D, 2-D and 3-D) keep their layers'
``layers`` Sequential (``fastdense.sequential_layer``); their dropout is channel-wise (Dropout2d/3d)
and so is the fast block's. In a torchvision, timm or MONAI ``DenseNet`` the stem's norm-relu-pool and each
plain transition also become fastdense's recomputing operators (``densenet.Features``,
``densenet.Transition``, any number of spatial dimensions), which keep no BatchNorm output; timm's
``BatchNormAct2d`` there is read as the BatchNorm with its ReLU inside.
SyncBatchNorm layers stay SyncBatchNorm (``fastdense.sync_batchnorm``).
timm and MONAI are never imported: their classes are recognised by name.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

from torch import nn
from torchvision.models.densenet import _DenseBlock, _DenseLayer

from .backend import check_backend_name
from .block import BATCH_NORMS, CONVS, FastDenseBlock
from .densenet import Features, Transition
from .foreign import foreign_class, timm_norm_relu
from .revert import ORIGINAL
from .sequential_layer import CHANNELWISE_DROPOUTS, SequentialDenseLayer

# A module's hook tables. convert hands them to the module that replaces it (the same dict objects, so a
# hook's handle still removes it): the fast block runs its layers one by one while one is hooked.
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_is_full_backward_hook",
)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    for table in _HOOK_TABLES:
        if hasattr(old, table):
            setattr(new, table, getattr(old, table))


def _kind(module: nn.Module) -> str | None:
    """Whose dense block ``module`` is: "torchvision", "timm", "monai", or None for none of them."""
    if isinstance(module, _DenseBlock):
        return "torchvision"
    if foreign_class(module, "DenseBlock", "timm"):
        return "timm"
    if foreign_class(module, "_DenseBlock", "monai"):
        return "monai"
    return None


def is_dense_block(module: nn.Module) -> bool:
    """A dense block ``convert`` knows: torchvision's ``_DenseBlock``, timm's ``DenseBlock`` or MONAI's
    ``_DenseBlock`` (1-D, 2-D or 3-D)."""
    return _kind(module) is not None


def _batch_norm(norm: nn.Module, spatial_dims: int) -> bool:
    kind_ok = type(norm) in (BATCH_NORMS[spatial_dims], nn.SyncBatchNorm)
    return kind_ok and norm.affine and norm.track_running_stats


_CONV_DIMS = {conv: spatial_dims for spatial_dims, conv in CONVS.items()}
_MONAI_MODULES = ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]


def _why_not_exact_layer(kind: str, layer: nn.Module, name: str) -> str | None:
    """The layer's class and its activations: the framework's own, unmodified."""
    if kind == "timm":
        if not foreign_class(layer, "DenseLayer", "timm"):
            return f"{name} is a {type(layer).__name__}, not timm's DenseLayer"
        if not (timm_norm_relu(layer.norm1) and timm_norm_relu(layer.norm2)):
            return f"{name} normalises with something other than BatchNorm2d followed by ReLU"
        return None
    if kind == "monai":
        if not foreign_class(layer, "_DenseLayer", "monai"):
            return f"{name} is a {type(layer).__name__}, not MONAI's _DenseLayer"
        names = list(layer.layers._modules)
        if names not in (_MONAI_MODULES, [*_MONAI_MODULES, "dropout"]):
            return f"{name}.layers holds {names}, not MONAI's norm-act-conv sequence"
        dropout = layer.layers._modules.get("dropout")
        if dropout is not None and type(dropout) not in (nn.Dropout, *CHANNELWISE_DROPOUTS):
            return f"{name} uses a {type(dropout).__name__}, not nn.Dropout or a channel-wise Dropout1d/2d/3d"
    elif not isinstance(layer, _DenseLayer) or type(layer).forward is not _DenseLayer.forward:
        return f"{name} is a {type(layer).__name__}, not torchvision's _DenseLayer"
    elif type(layer).bn_function is not _DenseLayer.bn_function:
        return f"{name} overrides bn_function"
    parts = _as_fast_layer(kind, layer)
    if not (type(parts.relu1) is nn.ReLU and type(parts.relu2) is nn.ReLU):
        return f"{name} uses an activation other than ReLU"
    return None


def _as_fast_layer(kind: str, layer: nn.Module) -> nn.Module:
    """The layer as the fast block reads it: MONAI's through ``SequentialDenseLayer``."""
    return SequentialDenseLayer(layer.layers) if kind == "monai" else layer


def _why_not_exact(block: nn.Module) -> str | None:
    """None when ``FastDenseBlock`` reproduces ``block`` exactly, else the reason it would not."""
    kind = _kind(block)
    if kind == "torchvision" and type(block).forward is not _DenseBlock.forward:
        return "its class overrides forward"
    originals = list(block.children())
    if not originals:
        return "it has no layers"
    for i, layer in enumerate(originals):
        reason = _why_not_exact_layer(kind, layer, f"denselayer{i + 1}")
        if reason is not None:
            return reason
    layers = [_as_fast_layer(kind, layer) for layer in originals]
    spatial_dims = _CONV_DIMS.get(type(layers[0].conv1))
    if spatial_dims is None:
        return "denselayer1.conv1 is not an nn.Conv1d, nn.Conv2d or nn.Conv3d"
    one, three = (1,) * spatial_dims, (3,) * spatial_dims
    c0, growth = layers[0].norm1.num_features, layers[0].conv2.out_channels
    for i, layer in enumerate(layers):
        name = f"denselayer{i + 1}"
        if kind == "timm":
            standard = timm_norm_relu(layer.norm1) and timm_norm_relu(layer.norm2)
        else:
            standard = _batch_norm(layer.norm1, spatial_dims) and _batch_norm(layer.norm2, spatial_dims)
        if not standard:
            return (
                f"{name} uses a normalisation other than an affine BatchNorm{spatial_dims}d with running "
                "statistics (instance, group or layer norm, ...)"
            )
        c1, c2 = layer.conv1, layer.conv2
        if not (_CONV_DIMS.get(type(c1)) == spatial_dims and _CONV_DIMS.get(type(c2)) == spatial_dims):
            return f"{name} mixes convolutions of other kinds or ranks"
        if (c1.kernel_size, c1.stride, c1.padding, c1.dilation, c1.groups) != (one, one, (0,) * spatial_dims, one, 1):
            return f"{name}.conv1 is not a plain 1x1 convolution"
        if (c2.kernel_size, c2.stride, c2.padding, c2.dilation, c2.groups) != (three, one, one, one, 1):
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
    norms = [norm for layer in layers for norm in (layer.norm1, layer.norm2)]
    synced = {isinstance(norm, nn.SyncBatchNorm) for norm in norms}
    if len(synced) > 1 or (synced == {True} and len({id(norm.process_group) for norm in norms}) > 1):
        return "it mixes SyncBatchNorm with other BatchNorms or process groups (statistics are shared)"
    return None


def _memory_efficient(layer: nn.Module) -> bool:
    return bool(getattr(layer, "memory_efficient", False) or getattr(layer, "grad_checkpointing", False))


def _fast_block(block: nn.Module, backend: str) -> FastDenseBlock:
    kind = _kind(block)
    originals = list(block.children())
    layers = [_as_fast_layer(kind, layer) for layer in originals]
    growth = layers[0].conv2.out_channels
    fast = FastDenseBlock(
        num_layers=len(layers),
        num_input_features=layers[0].norm1.num_features,
        bn_size=layers[0].conv1.out_channels // growth,
        growth_rate=growth,
        memory_efficient=any(_memory_efficient(layer) for layer in originals),
        backend=backend,
        spatial_dims=_CONV_DIMS[type(layers[0].conv1)],
    )
    _carry_hooks(block, fast)
    for i, (new, old) in enumerate(zip(list(fast.values()), originals, strict=True)):
        if kind == "monai":  # MONAI's own Sequential moves over whole: keys stay denselayerN.layers.*
            fast[f"denselayer{i + 1}"] = layers[i]
            _carry_hooks(old, layers[i])
            continue
        _carry_hooks(old, new)
        # Hand the original modules over, so parameters and buffers stay the very same objects. timm's
        # layers have no ReLU modules (BatchNormAct2d applies it): the fast layers keep their own, stateless.
        for child in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
            if hasattr(old, child):
                setattr(new, child, getattr(old, child))
        new.drop_rate, new.memory_efficient = old.drop_rate, _memory_efficient(old)
    fast.__dict__[ORIGINAL] = block  # for fastdense.revert: not a submodule, shares every module that holds state
    return fast.train(block.training)


def convert(module: nn.Module, *, backend: str = "auto", strict: bool = False) -> nn.Module:
    """Replace every torchvision ``_DenseBlock``, timm ``DenseBlock`` and MONAI ``_DenseBlock`` in
    ``module`` by an equivalent ``FastDenseBlock``.

    Works on a whole DenseNet, any model containing dense blocks, or a single block (then the new block
    is returned). Blocks that cannot be reproduced exactly are left alone with a ``UserWarning`` that
    names them and says why, or, with ``strict=True``, make it raise a ``ValueError`` before anything
    is changed. In a torchvision, timm or MONAI DenseNet whose blocks converted, the ``features`` Sequential and
    its plain transitions become fastdense's too (the stem's norm-ReLU-pool and each transition run fused,
    as in the built model; names, keys and parameters unchanged, the originals kept for ``revert``).
    Returns ``module`` (modified in place) or the new block.
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
    for network in [m for m in module.modules() if _is_densenet(m)]:
        # Only together with blocks that converted: a network whose blocks all stayed the original library's
        # keeps every module it had (same types, same repr), the stem and transitions included.
        if any(isinstance(m, FastDenseBlock) for m in network.features.children()):
            _convert_stem_and_transitions(network, backend)
    return module


def _is_densenet(module: nn.Module) -> bool:
    """torchvision's, timm's or MONAI's ``DenseNet`` (and MONAI's ``DenseNet121/169/201/264``), recognised by
    its class and parts: the networks whose stem and transitions ``convert`` swaps too."""
    classes = type(module).__mro__
    libraries = ("monai.", "timm.", "torchvision.")
    ours = any(cls.__name__ == "DenseNet" and cls.__module__.startswith(libraries) for cls in classes)
    return ours and type(getattr(module, "features", None)) is nn.Sequential


# The transitions convert swaps, by class, with their modules' names in the order they run.
_TRANSITIONS = {
    ("torchvision", "_Transition"): ["norm", "relu", "conv", "pool"],
    ("monai", "_Transition"): ["norm", "relu", "conv", "pool"],
    ("timm", "DenseTransition"): ["norm", "conv", "pool"],  # norm is BatchNormAct2d: the ReLU is inside
}


def _fast_transition(module: nn.Module, backend: str) -> Transition | None:
    """fastdense's Transition holding a torchvision, timm or MONAI transition's modules when those are the
    plain ones (BatchNorm, ReLU, bias-free 1x1 conv, average pool: ``Transition.exact``), else None."""
    names = next((names for (lib, cls), names in _TRANSITIONS.items() if foreign_class(module, cls, lib)), None)
    if names is None or list(module._modules) != names:
        return None
    transition = Transition.of_modules(OrderedDict(module._modules), backend=backend)
    return transition if transition.exact() else None


def _convert_stem_and_transitions(network: nn.Module, backend: str) -> None:
    """A torchvision, timm or MONAI DenseNet's ``features`` as fastdense's (the stem's norm-relu-pool as one
    recomputing op, which falls back to the modules one by one where they are not the plain ones) and its
    plain transitions as fastdense's; the replaced containers are kept for ``revert``. Keys are unchanged."""
    features = Features(OrderedDict(network.features._modules), backend=backend)
    for name, child in list(features.named_children()):
        transition = _fast_transition(child, backend)
        if transition is not None:
            _carry_hooks(child, transition)
            transition.__dict__[ORIGINAL] = child
            setattr(features, name, transition.train(child.training))
    _carry_hooks(network.features, features)
    features.__dict__[ORIGINAL] = network.features
    network.features = features.train(network.features.training)


def _refuse(message: str, strict: bool) -> None:
    if strict:
        raise ValueError(f"fastdense.convert(strict=True): {message}")
    warnings.warn(f"fastdense.convert: {message}", stacklevel=3)
