"""Microbenchmarks of the Triton kernels against what torchvision runs for the same step.

``python -m fastdense kernels [--batch 64] [--json out.json]``

* BN-ReLU-1x1 conv: ``bn_relu_gemm`` over a column prefix of a block buffer against torchvision's
  ``torch.cat`` of the feature list + BatchNorm + ReLU + cuDNN 1x1 conv, at one layer of each
  DenseNet-121 block (eval mode: running statistics).
* 3x3 conv into the buffer: the implicit-GEMM kernel (norm2-ReLU prologue, training statistics
  epilogue) against norm2-ReLU + cuDNN conv + copy into the buffer slice + a statistics reduction
  (the triton backend's ``FASTDENSE_CONV3X3=cudnn`` path).

Each row: median ms over interleaved repeats, achieved GB/s (the fewest bytes the fused op must
move) and TFLOP/s, as fractions of the device's measured copy bandwidth and matmul rate.
On the CPU it runs under the Triton interpreter at toy sizes (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
from itertools import accumulate, pairwise

import torch
import torch.nn.functional as F

from fastdense.batchnorm import NormMap

from .roofline import measure_peaks
from .timing import StepTimer

GROWTH, BN_SIZE = 32, 4
# (block, spatial side at 224 px, input channels of the layer measured): a late layer of each block.
DENSENET121_LAYERS = [(1, 56, 224), (2, 28, 480), (3, 14, 992), (4, 7, 992)]


def _norm(c: int, device) -> NormMap:
    """A BatchNorm map (batch mean and rstd, weight, bias) of realistic magnitude."""
    mean, bias = torch.randn(2, c, device=device) * 0.1
    return NormMap(mean, torch.rand(c, device=device) + 0.5, torch.ones(c, device=device), bias)


def gemm_case(batch: int, side: int, c_in: int, dtype, device) -> dict:
    from fastdense.kernels.bn_relu_gemm import bn_relu_gemm

    m, n_out = batch * side * side, BN_SIZE * GROWTH
    buf = torch.randn(m, c_in + GROWTH, device=device).to(dtype)
    norm = _norm(c_in, device)
    weight = (torch.randn(n_out, c_in, device=device) * c_in**-0.5).to(dtype)
    conv_weight = weight.view(n_out, c_in, 1, 1).contiguous(memory_format=torch.channels_last)
    # torchvision's inputs: the block's feature maps as separate channels_last tensors.
    images = buf.view(batch, side, side, -1).permute(0, 3, 1, 2)
    widths = [c_in - GROWTH * (c_in // GROWTH - 1)] + [GROWTH] * (c_in // GROWTH - 1)
    bounds = list(accumulate(widths, initial=0))
    features = [images[:, lo:hi].contiguous(memory_format=torch.channels_last) for lo, hi in pairwise(bounds)]
    eps = 1e-5  # torch 2.11's batch_norm refuses eps = 0: the variance takes it back out, same map
    running_mean, running_var = norm.mean.clone(), (1 / norm.inv).square() - eps

    def fused():
        bn_relu_gemm(buf[:, :c_in], norm, weight)

    def eager():
        x = torch.cat(features, 1)
        x = F.relu(F.batch_norm(x, running_mean, running_var, norm.weight, norm.bias, False, 0.0, eps))
        F.conv2d(x, conv_weight)

    size = buf.element_size()
    return {
        "kernel": "bn_relu_gemm",
        "shape": f"M={m} K={c_in} N={n_out}",
        "bytes": (m * c_in + m * n_out) * size,
        "flops": 2 * m * c_in * n_out,
        "candidates": {"triton bn_relu_gemm": fused, "cat+BN+ReLU+cuDNN 1x1": eager},
    }


def conv_case(batch: int, side: int, dtype, device) -> dict:
    from fastdense.kernels.conv3x3 import conv3x3
    from fastdense.kernels.stats import column_stats

    m, c = batch * side * side, BN_SIZE * GROWTH
    y = torch.randn(m, c, device=device).to(dtype)
    buf = torch.empty(m, 4 * GROWTH, device=device, dtype=dtype)
    norm = _norm(c, device)
    stats = torch.empty(3, GROWTH, device=device)
    weight = (torch.randn(GROWTH, c, 3, 3, device=device) * (9 * c) ** -0.5).to(dtype)

    def fused():
        conv3x3(y, weight, (batch, side, side), buf[:, :GROWTH], prologue=norm, stats=stats)

    def cudnn():
        act = ((y.float() - norm.mean) * norm.inv + norm.bias).to(dtype).relu_()
        new = F.conv2d(act.view(batch, side, side, c).permute(0, 3, 1, 2), weight, padding=1)
        buf[:, :GROWTH].view(batch, side, side, GROWTH).copy_(new.permute(0, 2, 3, 1))
        column_stats(buf[:, :GROWTH], out=stats)

    size = y.element_size()
    return {
        "kernel": "conv3x3",
        "shape": f"N={batch} H=W={side} C={c} k={GROWTH}",
        "bytes": (m * c + m * GROWTH) * size,
        "flops": 2 * m * 9 * c * GROWTH,
        "candidates": {"triton conv3x3 (prologue+stats)": fused, "BN-ReLU+cuDNN 3x3+copy+stats": cudnn},
    }


def measure(case: dict, device: torch.device, repeats: int, peaks) -> list[dict]:
    timer = StepTimer(device)
    candidates = case["candidates"]
    for fn in candidates.values():  # compile / autotune / cuDNN algorithm search
        fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):  # interleaved, so drifting clocks hit every candidate alike
        for name, fn in candidates.items():
            times[name].append(timer(fn))
    rows = []
    for name, samples in times.items():
        seconds = statistics.median(samples)
        rows.append({
            "kernel": case["kernel"], "shape": case["shape"], "candidate": name, "ms": seconds * 1e3,
            "GB_per_s": case["bytes"] / seconds / 1e9, "TFLOP_per_s": case["flops"] / seconds / 1e12,
            "copy_fraction": case["bytes"] / seconds / peaks.copy_bytes_per_s,
            "matmul_fraction": case["flops"] / seconds / peaks.matmul_flops,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    from . import describe

    parser = argparse.ArgumentParser(prog="python -m fastdense kernels", description=describe(__doc__))
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 1 on the CPU (interpreter)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 2 on the CPU")
    parser.add_argument("--json", help="write the rows and the device's peaks to this JSON file")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    batch, repeats = args.batch or (64 if cuda else 1), args.repeats or (50 if cuda else 2)
    layers = DENSENET121_LAYERS if cuda else [(4, 3, 40)]  # the interpreter needs toy sizes
    peaks = measure_peaks(device, dtype)
    rows = []
    for _, side, c_in in layers:
        rows += measure(gemm_case(batch, side, c_in, dtype, device), device, repeats, peaks)
        rows += measure(conv_case(batch, side, dtype, device), device, repeats, peaks)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: not a measurement)"
    print(f"{name}, {dtype}, batch {batch}; peaks: copy {peaks.copy_bytes_per_s / 1e9:.0f} GB/s, "
          f"matmul {peaks.matmul_flops / 1e12:.1f} TFLOP/s")  # fmt: skip
    print(f"{'kernel':13} {'shape':28} {'candidate':34} {'ms':>8} {'GB/s':>7} {'copy':>5} {'TFLOP/s':>8} {'mm':>5}")
    for r in rows:
        print(f"{r['kernel']:13} {r['shape']:28} {r['candidate']:34} {r['ms']:8.3f} {r['GB_per_s']:7.0f} "
              f"{r['copy_fraction']:5.2f} {r['TFLOP_per_s']:8.1f} {r['matmul_fraction']:5.2f}")  # fmt: skip
    if args.json:
        peak_figures = {"copy_bytes_per_s": peaks.copy_bytes_per_s, "matmul_flops": peaks.matmul_flops}
        result = {"device": name, "dtype": str(dtype), "batch": batch, "repeats": repeats, "rows": rows}
        result["peaks"] = peak_figures
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
