"""Named ranges around fastdense's stages, for torch.profiler tables and traces and for Nsight (NVTX).

Range names are ``fastdense.<stage>``: ``stats`` (batch statistics), ``gemm`` (BN-ReLU-1x1 conv),
``conv`` (3x3 conv), ``finalize`` (segment gradients), ``conv_backward``, ``norm_backward``,
``gemm_backward``, ``bn_relu_pool`` / ``bn_relu_pool_backward`` inside ``stem``, ``transition`` or
``head`` (and ``stem_backward``, ...), and ``transition`` (also the triton backend's fused transition).
"""

from __future__ import annotations

import torch

# The stages entered and not yet left, outermost first: what ``fastdense.tools.traffic`` attributes
# operators to (the profiler's ranges are not visible to a dispatch mode).
ACTIVE: list[str] = []


class stage:
    """``with stage(name, device):`` a named range around one of fastdense's stages: a ``torch.profiler``
    range while a profiler runs (entering one costs more than a small operator, so none otherwise), an
    NVTX range on CUDA (for Nsight, which nothing here can detect), and an entry in ``ACTIVE``."""

    __slots__ = ("_cuda", "_name", "_ranges")

    def __init__(self, name: str, device: torch.device) -> None:
        self._name, self._cuda, self._ranges = name, device.type == "cuda", []

    def __enter__(self) -> None:
        ACTIVE.append(self._name)
        label = f"fastdense.{self._name}"
        if torch.autograd._profiler_enabled():
            self._ranges.append(torch.profiler.record_function(label))
        if self._cuda:
            self._ranges.append(torch.cuda.nvtx.range(label))
        for r in self._ranges:
            r.__enter__()

    def __exit__(self, *exc) -> None:
        try:
            for r in reversed(self._ranges):
                r.__exit__(*exc)
        finally:
            ACTIVE.pop()
