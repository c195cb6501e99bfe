"""How fastdense modules show up when a model leaves eager PyTorch: FX graphs, TorchScript, torch.export.

Under ``torch.fx`` symbolic tracing (``symbolic_trace``, torchvision's ``create_feature_extractor``) a
dense block, a transition or a fastdense network receives a ``Proxy``, whose shape and device cannot be
checked or branched on. Blocks and transitions then record themselves as one ``call_module`` node, as
torch.nn's own modules do: the graph keeps the node names users know (``features.denseblock2``) and,
when it runs, calls the module with real tensors.

TorchScript (``torch.jit.script``) and ``torch.jit.trace`` (and so the legacy ONNX exporter) get the
original library's computation instead of the fused one: every fastdense module's ``forward`` runs its
``reference`` path there (``jit_compiling``), torchvision's (or timm's, MONAI's) sequence of modules and
``torch.cat``, on the very same modules and parameters. Scripting leaves the eager model as it is.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn


def jit_compiling() -> bool:
    """Whether TorchScript is compiling the caller, or ``torch.jit.trace`` is recording it."""
    return torch.jit.is_scripting() or torch.jit.is_tracing()


def exporting() -> bool:
    """Whether ``torch.export`` is tracing (strict or not), and not ``torch.compile``. Reads the flag
    export sets instead of calling ``torch.compiler.is_exporting()``: Dynamo in torch 2.11 answers that
    call with a constant True inside every ``torch.compile``, while it reads a module attribute's real value
    (False under compile, True under export) on every version since the flag exists."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def is_traced(x) -> bool:
    """Whether ``x`` is an FX tracing proxy (symbolic tracing), not a tensor."""
    return isinstance(x, torch.fx.Proxy)


def call_module_node(module: nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Record ``module(x)`` in the graph being traced as one ``call_module`` node, as for a leaf module."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})
