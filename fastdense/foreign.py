"""timm's and MONAI's classes, recognised by name (neither package is imported: both are optional)."""

from __future__ import annotations

from torch import nn


def foreign_class(module: nn.Module, name: str, package: str) -> bool:
    """Whether ``module`` is exactly ``package``'s class ``name``."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith(f"{package}.")


def timm_norm_relu(norm: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` computing ``relu(batch_norm(x))``: affine, running statistics, a plain ReLU,
    no dropout or anti-aliasing. It is an ``nn.BatchNorm2d`` with the ReLU inside, so fastdense's fused
    operators read its parameters and statistics as they read a BatchNorm2d's."""
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    return (
        foreign_class(norm, "BatchNormAct2d", "timm")
        and isinstance(norm, nn.BatchNorm2d)
        and norm.affine
        and norm.track_running_stats
        and type(act) is nn.ReLU
        and type(drop) is nn.Identity
        and not hasattr(norm, "aa")
    )
