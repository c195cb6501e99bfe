"""Time and peak memory of DenseNet steps, each measurement in a process of its own.

``python -m fastdense.measure --metric time --provider A B ... --mode train ...`` prints one JSON line: a
list with a row per provider. Times of all providers come from one process, their steps interleaved
(every round runs each provider once), so that drift of the machine's speed affects them alike and
their ratios hold. Peak memory is measured for one provider per process, from a clean slate:

* CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before the step.
* CPU: the process's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
  minus its resident set before the step. For this metric the parent sets ``MALLOC_MMAP_THRESHOLD_``
  and ``MALLOC_TRIM_THRESHOLD_`` so that glibc returns freed blocks to the system at once and the
  resident set follows live memory; timings run without them (they cost page faults). Memory in use
  before the step (weights, gradients, optimizer state) is not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

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
WARMUP_STEPS = 3
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


@dataclass(frozen=True)
class Setting:
    """What every provider is measured on."""

    model: str = "densenet121"
    mode: str = "train"
    batch: int = 8
    resolution: int = 224
    dtype: str = "float32"
    device: str = "cpu"
    channels_last: bool = False

    def row(self, provider: str, model: torch.nn.Module) -> dict:
        dev = torch.device(self.device)
        return {
            "provider": provider,
            "backend": getattr(model, "active_backend", None) or "torchvision",
            **asdict(self),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        }


def prepare(provider: str, setting: Setting):
    """The provider's model and a warmed-up step function on fresh random input."""
    dev = torch.device(setting.device)
    torch.manual_seed(0)
    model = PROVIDERS[provider](setting.model).to(dev)
    x = torch.randn(setting.batch, 3, setting.resolution, setting.resolution, device=dev)
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step = make_step(model, x, setting.mode, DTYPES[setting.dtype])
    # Allocations, one-time initialisation, optimizer state; several steps, because oneDNN on the CPU
    # keeps getting faster over the first calls of a new shape.
    for _ in range(WARMUP_STEPS):
        step()
    return model, step


def measure_memory(provider: str, setting: Setting) -> dict:
    model, step = prepare(provider, setting)
    peak = PeakMemory(torch.device(setting.device))
    peak.start()
    step()
    return setting.row(provider, model) | {"peak_mem_mb": peak.stop() / 2**20}


def measure_time(providers: list[str], setting: Setting, repeats: int) -> list[dict]:
    dev = torch.device(setting.device)
    prepared = {provider: prepare(provider, setting) for provider in providers}
    times: dict[str, list[float]] = {provider: [] for provider in providers}
    for _ in range(repeats):
        for provider, (_, step) in prepared.items():
            _sync(dev)
            start = time.perf_counter()
            step()
            _sync(dev)
            times[provider].append(time.perf_counter() - start)
    rows = []
    for provider, (model, _) in prepared.items():
        ms = statistics.median(times[provider]) * 1e3
        timing = {"repeats": repeats, "ms_median": ms, "ms_all": [t * 1e3 for t in times[provider]]}
        rows.append(setting.row(provider, model) | timing | {"images_per_s": setting.batch / (ms / 1e3)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", nargs="+", choices=sorted(PROVIDERS), required=True)
    parser.add_argument("--metric", choices=METRICS, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    defaults = Setting()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    setting = Setting(**{name: getattr(args, name) for name in asdict(defaults)})
    if args.metric == "memory":
        if len(args.provider) != 1:
            parser.error("--metric memory measures one provider per process")
        rows = [measure_memory(args.provider[0], setting)]
    else:
        rows = measure_time(args.provider, setting, args.repeats)
    json.dump(rows, sys.stdout)
    print()


if __name__ == "__main__":
    main()
