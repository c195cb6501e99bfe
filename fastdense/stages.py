"""Named ranges around fastdense's stages, for torch.profiler tables and traces and for Nsight (NVTX).

Range names are ``fastdense.<stage>``: ``stats`` (batch statistics), ``gemm`` (BN-ReLU-1x1 conv),
``conv`` (3x3 conv), ``finalize`` (segment gradients), ``conv_backward``, ``norm_backward``,
``gemm_backward``, ``bn_relu_pool`` / ``bn_relu_pool_backward`` inside ``stem``, ``transition`` or
``head`` (and ``stem_backward``, ...), and ``transition`` (also the triton backend's fused transition).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# The stages entered and not yet left, outermost first: what ``fastdense.tools.traffic`` attributes
# operators to (the profiler's ranges are not visible to a dispatch mode).
ACTIVE: list[str] = []


@contextmanager
def stage(name: str, device: torch.device):
    label = f"fastdense.{name}"
    ACTIVE.append(name)
    try:
        with torch.profiler.record_function(label):
            if device.type == "cuda":
                with torch.cuda.nvtx.range(label):
                    yield
            else:
                yield
    finally:
        ACTIVE.pop()
