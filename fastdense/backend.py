"""Which implementation runs a dense block: the fused Triton kernels or plain PyTorch ops.

``backend="auto"`` (the default everywhere) means: the environment variable ``FASTDENSE_BACKEND`` when
it is set, otherwise Triton for CUDA tensors once it is the CUDA default (``TRITON_DEFAULT_ON_CUDA``),
otherwise torch. An explicit ``backend="torch"`` or ``backend="triton"`` on a module always wins.

The Triton backend runs on CUDA tensors, and on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported), which is how the kernels are tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .devices import device_kind

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "FASTDENSE_BACKEND"

# "auto" picks Triton on CUDA only once the kernels have passed the GPU tests (benchmarks/gpu_check.sh)
# on a real card; until then CUDA users get the verified torch backend unless they ask for Triton.
TRITON_DEFAULT_ON_CUDA = False


def check_backend_name(backend: str, *, what: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


# Looked up once, at import: a block's forward asks on every call, and Dynamo (torch 2.11) refuses to
# trace importlib's find_spec, so a compiled triton-backend block must find the answer already known.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_FOUND


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(requested: str, device: torch.device) -> str:
    """Turn a module's ``backend`` setting into the backend that runs on tensors of ``device``."""
    check_backend_name(requested)
    if requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            requested = check_backend_name(env, what=f"environment variable {ENV_VAR}")
    kind = device_kind(device)
    if requested == "auto":
        use_triton = kind == "cuda" and TRITON_DEFAULT_ON_CUDA and triton_importable()
        return "triton" if use_triton else "torch"
    if requested == "triton":
        if not triton_importable():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed; use backend='torch'")
        if kind != "cuda" and not triton_interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors, got a {device.type} tensor; use backend='torch' "
                "(or set TRITON_INTERPRET=1 before importing triton to run the kernels in the slow interpreter)"
            )
    return requested
