"""``python -m fastdense profile``: where a few DenseNet steps spend their time, kernel by kernel.

Runs torch.profiler over ``--steps`` warmed-up steps of one provider and prints:

* ATen operators: calls, self time and share of the total; achieved TFLOP/s where the profiler counts
  FLOPs (matmuls, convolutions) and GB/s of their inputs (the bytes of the input tensors: a lower
  bound on traffic), both over the calls' inclusive time and as fractions of the device's measured
  matmul rate and copy bandwidth (``fastdense.tools.roofline.measure_peaks``);
* on CUDA, the GPU kernels by device time;
* fastdense's stages (``fastdense.stats``, ``.gemm``, ``.conv``, ``.finalize``, ...; the same names are
  NVTX ranges in an Nsight trace), inclusive time.

``--trace PATH`` writes a Chrome trace (open it in chrome://tracing or Perfetto).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from . import tables
from .measure import DTYPES, Setting, prepare
from .providers import MODELS, PROVIDERS
from .roofline import measure_peaks
from .timing import default_device, device_defaults


def _input_bytes(event, default_itemsize: int) -> int:
    dtypes = getattr(event, "input_dtypes", None) or [None] * len(event.input_shapes)
    total = 0
    for shape, dtype in zip(event.input_shapes, dtypes, strict=False):
        if not shape or not isinstance(shape, list):
            continue
        try:
            itemsize = torch.empty((), dtype=getattr(torch, dtype.replace("c10::", "").lower())).element_size()
        except (AttributeError, TypeError):
            itemsize = default_itemsize
        total += math.prod(shape) * itemsize
    return total


# Ops that only describe tensors (no data movement of their own): no GB/s for them.
METADATA_OPS = {
    "aten::view", "aten::as_strided", "aten::slice", "aten::permute", "aten::reshape", "aten::expand", "aten::t",
    "aten::transpose", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::detach",
    "aten::resolve_conj", "aten::resolve_neg", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::unbind", "aten::flatten", "aten::_unsafe_view", "aten::lift_fresh", "aten::set_",
}  # fmt: skip


def operator_rows(events, cuda: bool, default_itemsize: int) -> list[dict]:
    """ATen operators aggregated by name: calls and self time (us) for the share; FLOPs and input bytes
    with the inclusive time of the calls that have them, for the rates (a convolution's FLOPs sit on
    ``aten::convolution`` while its time is spent in a child op)."""
    rows: dict[str, dict] = defaultdict(
        lambda: {"calls": 0, "time_us": 0.0, "flops": 0, "flops_us": 0.0, "bytes": 0, "bytes_us": 0.0}
    )
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU or not event.name.startswith("aten::"):
            continue
        row = rows[event.name]
        row["calls"] += 1
        row["time_us"] += event.self_device_time_total if cuda else event.self_cpu_time_total
        inclusive = event.device_time_total if cuda else event.cpu_time_total
        if event.flops:
            row["flops"] += event.flops
            row["flops_us"] += inclusive
        if event.name not in METADATA_OPS:
            row["bytes"] += _input_bytes(event, default_itemsize)
            row["bytes_us"] += inclusive
    return sorted(({"name": k} | v for k, v in rows.items()), key=lambda r: -r["time_us"])


def kernel_rows(events) -> list[dict]:
    rows: dict[str, dict] = defaultdict(lambda: {"calls": 0, "time_us": 0.0})
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            rows[event.name]["calls"] += 1
            rows[event.name]["time_us"] += event.device_time_total
    return sorted(({"name": k} | v for k, v in rows.items()), key=lambda r: -r["time_us"])


def stage_rows(events, cuda: bool) -> list[dict]:
    rows: dict[str, dict] = defaultdict(lambda: {"calls": 0, "time_us": 0.0})
    for event in events:
        if event.name.startswith("fastdense.") and event.device_type == torch.autograd.DeviceType.CPU:
            rows[event.name]["calls"] += 1
            rows[event.name]["time_us"] += event.device_time_total if cuda else event.cpu_time_total
    return sorted(({"name": k} | v for k, v in rows.items()), key=lambda r: -r["time_us"])


def print_rows(title: str, rows: list[dict], limit: int, peaks=None) -> None:
    total = sum(r["time_us"] for r in rows) or 1.0
    headers = ["name", "calls", "ms", "share"]
    if peaks is not None:
        headers += ["TFLOP/s", "of matmul peak", "input GB/s", "of copy peak"]
    cells = []
    for r in rows[:limit]:
        row = [r["name"], str(r["calls"]), f"{r['time_us'] / 1e3:.2f}", f"{100 * r['time_us'] / total:.1f}%"]
        if peaks is not None:
            flops = r["flops"] / (r["flops_us"] / 1e6) if r["flops"] and r["flops_us"] > 0 else None
            rate = r["bytes"] / (r["bytes_us"] / 1e6) if r["bytes"] and r["bytes_us"] > 0 else None
            row += [
                "-" if flops is None else f"{flops / 1e12:.3f}",
                "-" if flops is None else f"{100 * flops / peaks.matmul_flops:.0f}%",
                "-" if rate is None else f"{rate / 1e9:.1f}",
                "-" if rate is None else f"{100 * rate / peaks.copy_bytes_per_s:.0f}%",
            ]
        cells.append(row)
    tables.print_table(title, headers, cells, text_columns=1)


def main(argv: list[str] | None = None) -> None:
    from . import describe

    parser = argparse.ArgumentParser(prog="python -m fastdense profile", description=describe(__doc__))
    parser.add_argument("--provider", default="fastdense", choices=sorted(PROVIDERS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--model", default="densenet121", choices=sorted(MODELS))
    parser.add_argument("--mode", default="train", choices=("infer", "train"))
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 8 on the CPU")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="rows per table")
    parser.add_argument("--trace", help="write a Chrome trace to this path")
    args = parser.parse_args(argv)
    device = default_device(args.device)
    cuda, defaults = device.startswith("cuda"), device_defaults(device)
    setting = Setting(
        model=args.model,
        mode=args.mode,
        batch=args.batch or (64 if cuda else 8),
        resolution=args.resolution,
        dtype=args.dtype or defaults["dtype"],
        device=device,
        channels_last=defaults["channels_last"] if args.channels_last is None else args.channels_last,
    )
    dtype = DTYPES[setting.dtype]
    peaks = measure_peaks(setting.torch_device, dtype)
    prepared = prepare(args.provider, setting)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
        for _ in range(args.steps):
            prepared.step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    print(
        f"{args.provider} ({PROVIDERS[args.provider].backend(prepared.model)}), {setting.model} {setting.mode}, "
        f"batch {setting.batch}, {setting.resolution}x{setting.resolution}, {setting.dtype}, {device}: "
        f"{args.steps} steps; measured peaks: matmul {peaks.matmul_flops / 1e12:.2f} TFLOP/s, "
        f"copy {peaks.copy_bytes_per_s / 1e9:.0f} GB/s"
    )
    itemsize = torch.empty((), dtype=dtype).element_size()
    print_rows("operators (self time)", operator_rows(events, cuda, itemsize), args.rows, peaks)
    if cuda:
        print_rows("GPU kernels", kernel_rows(events), args.rows)
    stages = stage_rows(events, cuda)
    if stages:
        print_rows("fastdense stages (inclusive time)", stages, args.rows)
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"wrote {args.trace}")
