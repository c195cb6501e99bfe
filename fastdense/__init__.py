"""fastdense: DenseNets on one shared buffer per dense block, a drop-in for torchvision's."""

from .backend import ENV_VAR as BACKEND_ENV_VAR
from .backend import resolve_backend
from .block import FastDenseBlock, FastDenseBlock3d, FastDenseLayer
from .convert import convert
from .densenet import FastDenseNet, Transition, densenet121, densenet161, densenet169, densenet201, densenet264
from .memory import PeakMemory, estimate_peak_memory
from .revert import revert

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV_VAR",
    "FastDenseBlock",
    "FastDenseBlock3d",
    "FastDenseLayer",
    "FastDenseNet",
    "PeakMemory",
    "Transition",
    "convert",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "estimate_peak_memory",
    "resolve_backend",
    "revert",
]
