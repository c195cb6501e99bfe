"""Roofline floor of DenseNet inference: multiply-accumulates, the fewest bytes a fused design moves,
and the device's measured matmul rate and copy bandwidth.

The byte count assumes docs/design.md's fused inference: each dense layer reads its input prefix once,
writes and reads back its bottleneck once and writes its new channels once; the stem writes and
reads its convolution output once; a transition reads its input once and writes its pooled output
once; weights are read once per batch. Halos, statistics and the classifier's input are neglected.
The floor is the larger of compute time (2 * MACs / matmul rate) and traffic time (bytes / copy rate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .providers import MODELS
from .timing import StepTimer

BN_SIZE = 4
NUM_CLASSES = 1000


@dataclass(frozen=True)
class Work:
    macs: int  # multiply-accumulates of one forward pass over the whole batch
    bytes: int  # fewest bytes a fused forward pass moves


def inference_work(model: str, batch: int, resolution: int, bytes_per_element: int) -> Work:
    growth, blocks, c0 = MODELS[model]
    conv0_side = (resolution + 1) // 2  # 7x7 conv, stride 2, padding 3
    side = (conv0_side + 1) // 2  # 3x3 max pool, stride 2, padding 1
    macs = conv0_side**2 * c0 * 3 * 49
    elements = 3 * resolution**2 + 2 * c0 * conv0_side**2 + c0 * side**2
    channels = c0
    params = 3 * c0 * 49
    for index, layers in enumerate(blocks):
        for layer in range(layers):
            c_in, bottleneck = channels + layer * growth, BN_SIZE * growth
            macs += side**2 * (c_in * bottleneck + bottleneck * growth * 9)
            elements += side**2 * (c_in + 2 * bottleneck + growth)
            params += c_in * bottleneck + bottleneck * growth * 9
        channels += layers * growth
        if index != len(blocks) - 1:  # transition: pool first, then the 1x1 conv on a quarter of the rows
            pooled = side // 2
            macs += pooled**2 * channels * (channels // 2)
            elements += side**2 * channels + pooled**2 * (channels // 2)
            params += channels * (channels // 2)
            side, channels = pooled, channels // 2
    macs += channels * NUM_CLASSES
    params += channels * NUM_CLASSES
    return Work(macs=macs * batch, bytes=(elements * batch + params) * bytes_per_element)


@dataclass(frozen=True)
class Peaks:
    matmul_flops: float  # measured dense matmul rate in the benchmark dtype, FLOP/s
    copy_bytes_per_s: float  # measured device-to-device copy, bytes read + written per second

    def floor_seconds(self, work: Work) -> float:
        return max(2 * work.macs / self.matmul_flops, work.bytes / self.copy_bytes_per_s)


# Roofline floors of counted steps (``python -m fastdense traffic``), per named card: the dense matmul rate
# in bf16/fp16 and in TF32 (float32 steps), and the memory bandwidth. "data sheet": NVIDIA's figures (H100
# SXM: 989 TFLOP/s bf16 and 495 TF32 dense, 3.35 TB/s; H200: the same rates, 4.8 TB/s). "measured": the
# GPU machine's own, measured there by the team before any fastdense run (bf16 matmul and device copy; no TF32 figure).
CARDS = {
    "H100 SXM, data sheet": (989e12, 495e12, 3.35e12),
    "H200, data sheet": (989e12, 495e12, 4.8e12),
    "H100, measured": (800e12, None, 3.0e12),
    "H200, measured": (790e12, None, 4.3e12),
}
# What a launch costs beyond its work: a kernel launch and PyTorch's dispatch of an eager operator, a few
# microseconds of CPU each; the floor takes 4 us (stated, not measured: a step whose launches outrun the
# GPU's work is bounded by them).
LAUNCH_SECONDS = 4e-6
# The host (CPU) time an eager PyTorch operator call takes on CUDA, Python to launch: published figures run from
# about 2 to 7 us (pytorch/pytorch#41383); ``python -m fastdense host`` counts each call at this (not measured).
ATEN_CALL_SECONDS = 5e-6


def card_peaks(card: str, half_precision: bool) -> tuple[float, float] | None:
    """(matmul FLOP/s, bytes/s) of a named card for a step's dtype; None where the card has no figure."""
    bf16, tf32, bandwidth = CARDS[card]
    matmul = bf16 if half_precision else tf32
    return None if matmul is None else (matmul, bandwidth)


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls: a peak is what the device reaches, not what it averages."""
    timer = StepTimer(device)
    fn()  # warm-up
    return min(timer(fn) for _ in range(repeats))


def measure_peaks(device: torch.device, dtype: torch.dtype) -> Peaks:
    """The device's matmul rate in ``dtype`` and its copy bandwidth, measured now (random data)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    matmul_s = _best_seconds(lambda: a @ b, device, repeats=10 if cuda else 5)
    size = (1 << 30) if cuda else (1 << 27)  # bytes per copy
    src = torch.randn(size // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device, repeats=10 if cuda else 5)
    return Peaks(matmul_flops=2 * n**3 / matmul_s, copy_bytes_per_s=2 * size / copy_s)
