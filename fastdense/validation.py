"""Input checks that turn bad input into a clear exception instead of a crash deep in a kernel."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a device autocast does not know (``meta``:
    models built and run there for their shapes, where PyTorch's own query raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or no context at all for a device autocast does not
    know (``meta``, where constructing one raises)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype GEMMs and convolutions run in: autocast's when it applies to ``x``, else ``x``'s."""
    device_type = x.device.type
    if x.dtype != torch.float64 and autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


_LAYOUTS = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def records_grad(x: Tensor, module: nn.Module) -> bool:
    """Whether autograd records ``module`` applied to ``x``: grad mode on, and ``x`` or one of the module's
    parameters requiring a gradient (checked in that order: a training step stops at the first)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def check_rank(x: Tensor, spatial_dims: int, name: str) -> None:
    """Refuse an input that is not a tensor of ``spatial_dims + 2`` dimensions (a batch), naming ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        unbatched = (
            " (one unbatched sample? add the batch dimension: x.unsqueeze(0))" if x.dim() == spatial_dims + 1 else ""
        )
        raise ValueError(
            f"{name}: input must be a {spatial_dims + 2}-D {_LAYOUTS[spatial_dims]} tensor "
            f"(spatial_dims={spatial_dims}), got {x.dim()}-D input of shape {tuple(x.shape)}{unbatched}"
        )


def check_input(x: Tensor, *, name: str, spatial_dims: int, channels: int, expects: str, weight: Tensor, owner: str):
    """Refuse an input that ``name``'s parameters (any of them: ``weight``) cannot consume: not a batch of
    ``spatial_dims``, not floating point, not ``channels`` channels (what ``expects`` says), on another
    device than the parameters of ``owner``, or of another dtype outside autocast."""
    check_rank(x, spatial_dims, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: input must have a floating point dtype, got {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: input has {x.shape[1]} channels but {expects}; input shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"{name}: input is on {x.device} but {owner} parameters are on {weight.device}")
    if x.dtype != weight.dtype and not autocast_enabled(x.device.type):
        raise TypeError(
            f"{name}: input dtype {x.dtype} does not match the parameters' dtype {weight.dtype} "
            "(convert one of them, or run under torch.autocast)"
        )


def check_stem_input(x: Tensor, conv0: nn.Module, spatial_dims: int, name: str) -> None:
    """Check a network's input against its stem convolution ``conv0``, before any kernel sees it."""
    channels = conv0.weight.shape[1] * conv0.groups
    expects = f"conv0 expects {channels} (its in_channels)"
    check_input(x, name=name, spatial_dims=spatial_dims, channels=channels, expects=expects, weight=conv0.weight,
                owner="the model's")  # fmt: skip


def check_transition_input(x: Tensor, norm: nn.Module, spatial_dims: int, name: str) -> None:
    """Check a fused transition's input against its BatchNorm ``norm``, before any kernel sees it."""
    expects = f"its norm expects {norm.num_features} (num_features)"
    check_input(x, name=name, spatial_dims=spatial_dims, channels=norm.num_features, expects=expects,
                weight=norm.weight, owner="the transition's")  # fmt: skip


def check_block_input(
    x: Tensor,
    *,
    expected_channels: int,
    weight: Tensor,
    training: bool,
    name: str = "FastDenseBlock",
    spatial_dims: int = 2,
) -> None:
    """Check a dense block's input against what its parameters can consume.

    ``weight`` is any parameter of the block; it fixes the expected device and (outside autocast)
    the expected dtype.
    """
    expects = f"the block expects {expected_channels} (num_input_features)"
    check_input(x, name=name, spatial_dims=spatial_dims, channels=expected_channels, expects=expects, weight=weight,
                owner="the block's")  # fmt: skip
    if training and x.numel() == x.shape[1]:
        raise ValueError(
            f"{name}: expected more than 1 value per channel when training (BatchNorm batch statistics), "
            f"got input size {tuple(x.shape)}; use a larger batch or call .eval()"
        )
