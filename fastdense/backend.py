"""Which implementation runs a dense block: the fused Triton kernels or plain PyTorch ops.

``backend="auto"`` (the default everywhere) means: the environment variable ``FASTDENSE_BACKEND`` when
it is set, otherwise Triton for CUDA tensors when the Triton backend is available, otherwise torch.
An explicit ``backend="torch"`` or ``backend="triton"`` on a module always wins.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "FASTDENSE_BACKEND"

# Flipped when the Triton forward/backward kernels land (see the project's Triton issues). Until then
# "auto" never picks Triton, and an explicit "triton" raises NotImplementedError.
TRITON_BACKEND_IMPLEMENTED = False


def check_backend_name(backend: str, *, what: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    """Turn a module's ``backend`` setting into the backend that runs on tensors of ``device``."""
    check_backend_name(requested)
    if requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            requested = check_backend_name(env, what=f"environment variable {ENV_VAR}")
    if requested == "auto":
        use_triton = device.type == "cuda" and TRITON_BACKEND_IMPLEMENTED and triton_importable()
        return "triton" if use_triton else "torch"
    if requested == "triton" and not TRITON_BACKEND_IMPLEMENTED:
        raise NotImplementedError(
            "backend='triton' is not implemented yet: the fused Triton kernels have not landed. "
            "Use backend='torch' (or 'auto', which picks torch for now)."
        )
    return requested
