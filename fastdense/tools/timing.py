"""Timing one call on a device: CUDA events on the GPU, the host clock on the CPU."""

from __future__ import annotations

import time

import torch


class StepTimer:
    """Wall time of one call, in seconds. On CUDA also ``enqueued``: the host time the call took to return,
    before waiting for the device (Python, dispatch and launches: when it is about the GPU time, the host
    is what the step waits on)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.enqueued: float | None = None

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            begin = time.perf_counter()
            fn()
            self.enqueued = time.perf_counter() - begin
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def default_device(requested: str | None) -> str:
    """The device a tool runs on: the one asked for (``--device``), else CUDA when present, else the CPU."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def device_defaults(device: str) -> dict:
    """What the tools measure by default on a device: bf16 channels_last on CUDA, fp32 NCHW on the CPU."""
    cuda = device.startswith("cuda")
    return {"dtype": "bfloat16" if cuda else "float32", "channels_last": cuda}
