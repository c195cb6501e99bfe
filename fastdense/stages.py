"""Named ranges around fastdense's stages, for torch.profiler tables and traces and for Nsight (NVTX).

Range names are ``fastdense.<stage>``: ``stats`` (batch statistics), ``gemm`` (BN-ReLU-1x1 conv),
``conv`` (3x3 conv), ``finalize`` (segment gradients), ``conv_backward``, ``norm_backward``,
``gemm_backward``, ``bn_relu_pool`` / ``bn_relu_pool_backward`` (stem, transitions, head) and
``transition`` (the triton backend's fused transition).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def stage(name: str, device: torch.device):
    label = f"fastdense.{name}"
    with torch.profiler.record_function(label):
        if device.type == "cuda":
            with torch.cuda.nvtx.range(label):
                yield
        else:
            yield
