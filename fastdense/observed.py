"""One rule for every fused part: while something watches its modules, it runs them one by one.

A fused operator (a dense block; the stem's, the transitions' and the head's BatchNorm-ReLU-pool) never
calls the modules it holds, so a hook on one of them would never fire, and a TorchDispatchMode that
observes operators (ptflops' aten backend, a memory tracker, a user's own mode) would see one opaque
operator, or Triton launches it cannot read. So a fused part runs its modules as the original library
does (each module called, with the tensors torchvision's model would pass it) while any of them has a
hook (forward, forward pre-, backward), while a global module hook is registered (other than a module
tracker's), or under a dispatch mode that is none of: PyTorch's tracing machinery (fake tensors,
``make_fx``, functionalization, ``torch.export``), ``FlopCounterMode`` (which counts the block operators
by the formulas of ``fastdense.flops``), fastdense's own counters (``OWN_COUNTER``). Memory and speed are
then the original library's for that part; the fused path is back once the hook or mode is gone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

# An attribute, True on the dispatch modes fastdense's own counters run under (``tools.traffic.TrafficCounter``,
# the memory count's operator opener and its ``MemTracker``): they see the fused operators as they are and
# count what runs inside them themselves.
OWN_COUNTER = "fastdense_counter"


def _hooked_module(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` or any module inside it has a forward, forward-pre or backward hook."""
    pending = [module]
    while pending:  # a plain walk: ``modules()`` keeps a memo set, several times slower on a block's 170
        m = pending.pop()
        if _hooked_module(m):
            return True
        pending.extend(m._modules.values())
    return False


# Global hooks that only record which module runs (to name where counts belong): FlopCounterMode's
# ModuleTracker, MemTracker's ModTracker. They look at no tensor, so they watch nothing.
_MODULE_TRACKERS = ("torch.utils.module_tracker", "torch.distributed._tools.mod_tracker")


def _watching(hook) -> bool:
    return type(getattr(hook, "__self__", None)).__module__ not in _MODULE_TRACKERS


def global_hooks() -> bool:
    """Whether a hook registered for every module (``torch.nn.modules.module.register_module_*_hook``) is on,
    other than a module tracker's."""
    registry = torch.nn.modules.module
    hooks = (
        registry._global_forward_hooks,
        registry._global_forward_pre_hooks,
        registry._global_backward_hooks,
        registry._global_backward_pre_hooks,
    )
    return any(_watching(hook) for table in hooks if table for hook in table.values())


_TRACING_MODES: tuple[type, ...] | None = None


def _tracing_modes() -> tuple[type, ...]:
    """PyTorch's modes that trace or transform rather than observe, and FlopCounterMode's, which counts the
    block operators through the formulas ``fastdense.flops`` registers (imported once, on first use)."""
    global _TRACING_MODES
    if _TRACING_MODES is None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch._subclasses.functional_tensor import FunctionalTensorMode
        from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
        from torch.utils import checkpoint, flop_counter

        # Selective activation checkpointing's modes cache operators' outputs; they observe nothing.
        caching = tuple(getattr(checkpoint, n) for n in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode")
                        if hasattr(checkpoint, n))  # fmt: skip
        flops = tuple(
            getattr(flop_counter, n) for n in ("_FlopCounterMode", "FlopCounterMode") if hasattr(flop_counter, n)
        )
        _TRACING_MODES = (FakeTensorMode, FunctionalTensorMode, ProxyTorchDispatchMode, *caching, *flops)
    return _TRACING_MODES


def observing_mode() -> bool:
    """Whether a TorchDispatchMode that observes operators is active (a user's FLOP or memory counter)."""
    stack = _get_current_dispatch_mode_stack()
    own = [mode for mode in stack if isinstance(mode, _tracing_modes()) or getattr(mode, OWN_COUNTER, False)]
    return len(own) != len(stack)


def watched(*modules: nn.Module) -> bool:
    """Whether a fused part holding ``modules`` must run them one by one now (see the module's doc).
    Never under ``torch.compile``, which traces the modules itself."""
    if torch.compiler.is_compiling():
        return False
    return global_hooks() or observing_mode() or any(hooked(m) for m in modules if m is not None)
