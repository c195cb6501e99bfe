"""``python -m fastdense host``: the host (CPU) time a step takes to issue its work, measured without a GPU.

A step of each provider runs on the CPU as it would on a GPU: the providers' Python, the autograd engine and
the optimizer (SGD, foreach: the traffic count's step), fastdense's operator choices for a GPU
(``devices.counted_as``), and every Triton kernel launch through fastdense's launcher and Triton's whole
launch path down to the driver's launch call, which is a stub that returns at once (``stub_cuda``). The
PyTorch operators the step calls run too, on the CPU and on a small input. Those that launch a kernel on a GPU
(the traffic count's: not views, allocations or metadata) do arithmetic here that is no GPU host's work, so
steps under the CPU profiler, interleaved with plain ones, give their time to take out of a plain step's wall
time (less what the profiler adds to each call it records: the profiled steps' extra time per call), and each such
call is counted instead at the host cost of an eager PyTorch operator on CUDA (``roofline.ATEN_CALL_SECONDS``,
a published figure); views and allocations stay in the measured part:

    host time = measured (Python, autograd, views, Triton launches) + launching PyTorch calls x 5 us (counted)

The step's work on the device is what its roofline floor counts (``python -m fastdense traffic``, printed
beside): a step whose host time is above its floor keeps the GPU waiting on the CPU (unless captured in a CUDA
graph). The operator sequence does not depend on the batch (the input is 2 images of ``--resolution``
pixels; ``--floor-batch`` sets the floors' batch). Every figure is of this machine's CPU; the GPU check
measures the real one (``host_ms_median``: a step's enqueue time on the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass


@dataclass
class HostTime:
    provider: str
    model: str
    mode: str
    dtype: str
    host_ms: float  # measured_ms + aten_calls x ATEN_CALL_SECONDS: the step's host time on a GPU machine
    measured_ms: float  # the step's wall time less its PyTorch operators' (median over --repeats steps)
    aten_calls: int  # calls of PyTorch operators that launch kernels on a GPU, from Python or autograd
    triton_launches: int
    wall_ms: float  # the whole step on this CPU, its operators' arithmetic on the small input included
    spread_ms: tuple[float, float]  # measured_ms, 20th and 80th percentiles over the steps
    profiler_us_per_event: float  # what the profiler adds to an operator call it records (its extra time per call)
    floors: dict  # the traffic count's roofline floors (ms) at --floor-batch, per card
    floor_batch: int
    note: str = "host time on this CPU: measured Python, autograd and Triton launch path + counted PyTorch calls"


def _launching_calls(events, launching: set[str]) -> tuple[float, int, int]:
    """Seconds spent in, and the number of, the PyTorch operator calls made from Python or autograd (not
    from inside another operator) that launch a kernel: named in ``launching`` (as the profiler names them,
    ``aten::mm``), or calling one (``aten::to`` its ``aten::_to_copy``); and how many profiled events those
    calls hold (themselves and every operator inside them)."""

    def launches(event) -> bool:
        return event.name in launching or any(launches(child) for child in event.cpu_children)

    def events_in(event) -> int:
        return 1 + sum(events_in(child) for child in event.cpu_children)

    total, calls, inner = 0.0, 0, 0
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None and launches(event):
            total += event.time_range.elapsed_us() * 1e-6
            calls += 1
            inner += events_in(event)
    return total, calls, inner


def _launching_operators(provider: str, model: str, mode: str, dtype: str, resolution: int) -> set[str]:
    """The PyTorch operators that launch kernels in the provider's step, by the traffic count's tally (views,
    allocations and metadata queries are not in it), named as the profiler names them."""
    from .traffic import count_step

    tally = count_step(provider, model, mode, 2, resolution, dtype).by_operator
    return {"aten::" + name.split(".")[1] for name in tally if name.startswith("aten.")}


def measure(provider: str, model: str, mode: str, dtype: str, resolution: int, repeats: int) -> dict:
    """One provider's step, timed as the module docstring says (in this process, the stub driver active)."""
    import torch
    import torch.nn.functional as F

    from fastdense.devices import counted_as
    from fastdense.kernels.launch import recording

    from .measure import DTYPES
    from .providers import PROVIDERS

    compute = DTYPES[dtype]
    torch.manual_seed(0)
    net = PROVIDERS[provider].build(model).train(mode == "train").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (2,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, foreach=True)  # the traffic count's step
    autocast = torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32)

    def step() -> None:
        if mode == "infer":
            with torch.inference_mode(), autocast:
                net(x)
            return
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()

    with counted_as("cuda"):
        step()  # compiles the Triton kernels for sm_90 (cached afterwards), autotuning off
        with recording(run=True) as launches:
            step()
        # Plain and profiled steps interleaved, so that both see the same load on a shared machine.
        walls, profiled, profiles = [], [], []
        for _ in range(repeats):
            begin = time.perf_counter()
            step()
            walls.append(time.perf_counter() - begin)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                begin = time.perf_counter()
                step()
                profiled.append(time.perf_counter() - begin)
            profiles.append(profile.events())
    launching = _launching_operators(provider, model, mode, dtype, resolution)
    events = statistics.median(len(e) for e in profiles)
    # What the profiler adds to each operator call it records (the launching calls' intervals hold theirs
    # and those of the calls inside them), from the profiled steps' extra wall time.
    per_event = max(statistics.median(profiled) - statistics.median(walls), 0.0) / events
    measured, calls = [], 0
    for wall, step_events in zip(walls, profiles, strict=True):
        aten_seconds, calls, inner = _launching_calls(step_events, launching)
        measured.append(wall - (aten_seconds - per_event * inner))
    median = statistics.median(measured)
    quantiles = statistics.quantiles(measured, n=5, method="inclusive") if len(measured) > 1 else [median] * 4
    return {
        "provider": provider, "model": model, "mode": mode, "dtype": dtype, "measured_ms": median * 1e3,
        "aten_calls": calls, "triton_launches": len(launches), "wall_ms": statistics.median(walls) * 1e3,
        "spread_ms": (quantiles[0] * 1e3, quantiles[-1] * 1e3), "profiler_us_per_event": per_event * 1e6,
    }  # fmt: skip


def _worker(argv: list[str]) -> None:
    """``--worker``: measure in this (fresh) process, with the stub CUDA driver and fixed configurations."""
    os.environ["FASTDENSE_AUTOTUNE"] = "0"  # before the kernels' launcher is imported: no timing trials
    from . import stub_cuda

    stub_cuda.activate()
    provider, model, mode, dtype, resolution, repeats = argv
    print(json.dumps(measure(provider, model, mode, dtype, int(resolution), int(repeats))))


def host_times(providers, model, modes, dtype, resolution, repeats, floor_batch) -> list[HostTime]:
    """Each provider and mode measured in a process of its own (the stub driver replaces Triton's), with
    the floors of the traffic count at ``floor_batch``."""
    import subprocess

    from .roofline import ATEN_CALL_SECONDS
    from .traffic import count_step

    results = []
    for mode in modes:
        for provider in providers:
            command = [sys.executable, "-m", "fastdense.tools.host", "--worker", provider, model, mode, dtype,
                       str(resolution), str(repeats)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"host time of {provider} ({mode}) failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            floors = count_step(provider, model, mode, floor_batch, 224, dtype).floors
            host = row["measured_ms"] + row["aten_calls"] * ATEN_CALL_SECONDS * 1e3
            results.append(HostTime(host_ms=host, floors={k: v * 1e3 for k, v in floors.items()},
                                    floor_batch=floor_batch, **row))  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    from .measure import DTYPES, MODES
    from .providers import MODELS, PROVIDERS
    from .roofline import ATEN_CALL_SECONDS

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return
    from . import describe

    parser = argparse.ArgumentParser(prog="python -m fastdense host", description=describe(__doc__))
    parser.add_argument("--model", default="densenet121", choices=sorted(MODELS))
    parser.add_argument("--providers", nargs="+", default=["torchvision-eager", "fastdense", "fastdense-triton"])
    parser.add_argument("--mode", default="both", choices=[*MODES, "both"])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="autocast dtype (float32: none)")
    parser.add_argument("--resolution", type=int, default=32, help="the small input's size (2 images)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--floor-batch", type=int, default=64, help="the batch of the floors printed beside")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    unknown = [p for p in args.providers if p not in PROVIDERS or PROVIDERS[p].compile_mode or PROVIDERS[p].cuda_graph]
    if unknown:
        parser.error(f"--providers: eager providers only, got {unknown}")
    modes = MODES if args.mode == "both" else (args.mode,)
    results = host_times(args.providers, args.model, modes, args.dtype, args.resolution, args.repeats,
                         args.floor_batch)  # fmt: skip
    print(f"{args.model}, {args.dtype}: host time of one step in ms (measured on this CPU: Python, autograd and "
          f"Triton launches to a stub driver; + PyTorch calls x {ATEN_CALL_SECONDS * 1e6:.0f} us, counted), "
          f"beside the step's H200 roofline floor at batch {args.floor_batch} (a floor, not a time)")  # fmt: skip
    for r in results:
        floor = r.floors.get("H200, data sheet")
        versus = f", {r.host_ms / floor:.2f}x the floor" if floor else ""
        print(f"{r.mode:5} {r.provider:30} host {r.host_ms:6.1f} = {r.measured_ms:5.1f} measured + {r.aten_calls:5d} "
              f"PyTorch calls; {r.triton_launches:4d} Triton launches; floor {floor or 0:5.1f}{versus}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
