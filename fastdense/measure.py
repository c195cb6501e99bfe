"""Time or peak memory of one provider's DenseNet step, measured in a process of its own.

``python -m fastdense.measure --provider fastdense --mode train --metric memory ...`` prints one JSON
line. The report starts one such process per provider, mode and metric, so that every figure is
measured from a clean slate. Peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before the step.
* CPU: the process's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
  minus its resident set before the step. For this metric the parent sets ``MALLOC_MMAP_THRESHOLD_``
  so that glibc returns large freed blocks to the system at once and the resident set follows live
  memory; timings run without it (it costs page faults), in a process of their own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import fastdense

PROVIDERS = {
    "torchvision-eager": lambda name: getattr(torchvision.models, name)(),
    "torchvision-memory-efficient": lambda name: getattr(torchvision.models, name)(memory_efficient=True),
    "fastdense": lambda name: getattr(fastdense, name)(),
    "fastdense-memory-efficient": lambda name: getattr(fastdense, name)(memory_efficient=True),
}
MODES = ("infer", "train")
WARMUP_STEPS = 2
METRICS = ("time", "memory")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Extra peak memory of the code run between ``start()`` and ``stop()``, in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self.base = _proc_status_bytes("VmRSS")

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _proc_status_bytes("VmHWM") - self.base


def make_step(model: torch.nn.Module, x: torch.Tensor, mode: str, dtype: torch.dtype):
    """One inference forward or one training step (forward, cross-entropy, backward, SGD update)."""
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)
    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(x)

        return step
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    provider: str,
    model_name: str,
    mode: str,
    metric: str,
    batch: int,
    resolution: int,
    dtype: str,
    device: str,
    channels_last: bool,
    repeats: int,
) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = PROVIDERS[provider](model_name).to(dev)
    x = torch.randn(batch, 3, resolution, resolution, device=dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step = make_step(model, x, mode, DTYPES[dtype])
    # Warm-up: allocations, one-time initialisation, optimizer state. Two steps, because oneDNN on
    # the CPU keeps getting faster over the first calls of a new shape.
    for _ in range(WARMUP_STEPS):
        step()
    backend = getattr(model, "active_backend", None) or "torchvision"
    row = {
        "provider": provider,
        "backend": backend,
        "model": model_name,
        "mode": mode,
        "batch": batch,
        "resolution": resolution,
        "dtype": dtype,
        "channels_last": channels_last,
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
    if metric == "memory":
        peak = PeakMemory(dev)
        peak.start()
        step()
        return row | {"peak_mem_mb": peak.stop() / 2**20}
    times = []
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    timing = {"repeats": repeats, "ms_median": ms, "ms_all": [t * 1e3 for t in times]}
    return row | timing | {"images_per_s": batch / (ms / 1e3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=sorted(PROVIDERS), required=True)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--metric", choices=METRICS, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    row = measure(
        args.provider,
        args.model,
        args.mode,
        args.metric,
        args.batch,
        args.resolution,
        args.dtype,
        args.device,
        args.channels_last,
        args.repeats,
    )
    json.dump(row, sys.stdout)
    print()


if __name__ == "__main__":
    main()
