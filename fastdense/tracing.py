"""How fastdense modules show up when a model leaves eager PyTorch: FX graphs and TorchScript.

Under ``torch.fx`` symbolic tracing (``symbolic_trace``, torchvision's ``create_feature_extractor``) a
dense block, a transition or a fastdense network receives a ``Proxy``, whose shape and device cannot be
checked or branched on. Blocks and transitions then record themselves as one ``call_module`` node, as
torch.nn's own modules do: the graph keeps the node names users know (``features.denseblock2``) and,
when it runs, calls the module with real tensors. TorchScript cannot compile the block's operator, so
scripting and tracing raise fastdense's error that names the way out, ``fastdense.revert``.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

TORCHSCRIPT_HELP = (
    "TorchScript cannot compile fastdense's fused dense block. fastdense.revert(model) turns the model back "
    "into the original library's modules (torchvision, timm or MONAI), holding the same parameters, and "
    "those script and trace: torch.jit.script(fastdense.revert(copy.deepcopy(model))). For deployment "
    "without TorchScript, torch.export and torch.onnx.export(model, (x,), dynamo=True) take the model as it is."
)


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


def refuse_torchscript(what: str) -> None:
    """Raise fastdense's TorchScript error when the JIT tracer is recording (``torch.jit.trace``)."""
    if torch.jit.is_tracing():
        raise RuntimeError(f"{what} cannot be traced by torch.jit.trace. {TORCHSCRIPT_HELP}")


class NotScriptable:
    """Mixin: ``torch.jit.script`` asks each module to prepare itself; a fastdense module refuses clearly."""

    def __prepare_scriptable__(self):
        raise RuntimeError(f"{type(self).__name__} cannot be compiled by torch.jit.script. {TORCHSCRIPT_HELP}")
