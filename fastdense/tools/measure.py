"""Time, peak memory, accuracy and the largest trainable batch of DenseNet steps, one process each.

``python -m fastdense.tools.measure --metric time --provider A B ... --mode train ...`` prints one JSON line: a
list with a row per provider. Every measurement runs in a fresh process:

* time: all requested providers in one process, their steps interleaved (every round runs each
  provider once), so that drift of the machine's speed affects them alike and their ratios hold.
  The first step (compilation, autotuning, allocator warm-up) is timed and reported on its own; the
  median and the 20th/80th percentiles come from the rounds after the warm-up. CUDA steps are timed
  with CUDA events. After timing, each eager provider's output is compared with torchvision in
  float64 on the same weights and input (``max_rel_err``; None for torch.compile rows, whose check
  would compile once more).
* memory: CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before the
  step, measured for every provider in the timing process (the allocator's counters are exact even
  with other models resident). CPU, one provider per process: the resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus the resident set before the step; the parent sets
  ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (see ``ALLOCATOR_ENV``) so that glibc
  hands freed blocks back at once and the resident set follows live memory. Memory in use before the
  step (weights, gradients, optimizer state) is not counted.
* max-batch (CUDA, training): the largest batch one training step fits in, by doubling then bisection.
* peaks: the device's matmul rate in the benchmark dtype and its copy bandwidth (``fastdense.tools.roofline``).
* warm: build and run one step of each provider, nothing timed: fills the compile caches
  (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``) that a later process on the same setting then reads.

A provider that fails (an exception while building, warming up or timing it) becomes a row with its
``error``; the others are measured on. A process that dies outright (a crash) is handled by the caller
(``fastdense.tools.bench``), which then measures each of its providers in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torchvision

from .providers import MODELS, PROVIDERS
from .roofline import measure_peaks
from .timing import StepTimer

MODES = ("infer", "train")
WARMUP_STEPS = 3
METRICS = ("time", "memory", "max-batch", "peaks", "warm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0"}  # for CPU memory runs


def run_worker(command: list[str], *, memory: bool, what: str):
    """Run a measuring ``command`` in a fresh process (with ``ALLOCATOR_ENV`` for a memory measurement:
    glibc hands freed blocks back, so the resident set follows live memory) and return the JSON of its
    last output line; a failure raises a RuntimeError naming ``what`` and quoting its error output."""
    env = dict(os.environ) | (ALLOCATOR_ENV if memory else {})
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise WorkerFailed(f"{what} failed (exit status {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class WorkerFailed(RuntimeError):
    """A measuring process that exited with an error; its message ends with the process's error output."""


def describe(error: BaseException) -> str:
    """An exception as a table cell and a JSON field: its type and the first line of its message (for a
    failed measuring process, the last line of its error output: the exception that ended it)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if isinstance(error, WorkerFailed):
        return f"process failed: {lines[-1][:300]}" if len(lines) > 1 else lines[0]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


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

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def row(self, provider: str) -> dict:
        dev = self.torch_device
        return {
            "provider": provider,
            **asdict(self),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        }


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


@dataclass
class Prepared:
    """A provider's model on fresh random input, with the step a benchmark times."""

    model: torch.nn.Module  # the eager module (its state_dict, its backend)
    x: torch.Tensor
    step: object
    first_step_s: float  # the first call: compilation, autotuning, allocator warm-up (and a graph's capture)
    graph_peak_bytes: int | None = None  # a CUDA graph provider's: its warm-up and capture, which replays reuse


def make_step(model, x: torch.Tensor, mode: str, dtype: torch.dtype, params, *, cache_casts: bool = True,
              classes: int = 1000):  # fmt: skip
    """One inference forward or one training step (forward, cross-entropy against random targets of ``classes``
    classes, backward, SGD update: foreach on CUDA, PyTorch's default there). ``cache_casts``: autocast's cache
    of cast weights (off in a CUDA graph, as PyTorch requires)."""
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=cache_casts)
    if mode == "infer":

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(x)

        return step
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    target = torch.randint(0, classes, (x.shape[0],), device=x.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()

    return step


def graphed_step(step, device: torch.device, warmup_steps: int = WARMUP_STEPS):
    """``step`` captured in one CUDA graph: ``warmup_steps`` eager calls on a side stream first (autotuning,
    cuDNN's algorithm choices, the optimizer's state: nothing may be chosen or allocated for the first time
    inside a capture), then the capture (its tensors in the graph's own memory pool, which every replay
    reuses). Returns the replay, which runs the whole step as one launch from the host, and the peak memory
    of warm-up and capture."""
    peak = PeakMemory(device)
    peak.start()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # (a training step sets its gradients to None first: backward allocates them in the pool)
    return graph.replay, peak.stop()


def prepare(provider: str, setting: Setting, warmup_steps: int = WARMUP_STEPS) -> Prepared:
    """Build the provider's model, wrap it (torch.compile), and warm it up."""
    dev = setting.torch_device
    torch.manual_seed(0)
    spec = PROVIDERS[provider]
    model = spec.build(setting.model).to(dev).train(setting.mode == "train")
    x = torch.randn(setting.batch, 3, setting.resolution, setting.resolution, device=dev)
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step = make_step(spec.wrap(model), x, setting.mode, DTYPES[setting.dtype], model.parameters(),
                     cache_casts=not spec.cuda_graph)  # fmt: skip
    timer = StepTimer(dev)
    if spec.cuda_graph:
        if dev.type != "cuda":
            raise ValueError(f"{provider} captures CUDA graphs: it needs a CUDA device, not {dev}")
        captured = []
        first = timer(lambda: captured.extend(graphed_step(step, dev)))
        replay, graph_peak = captured
        return Prepared(model, x, replay, first, graph_peak)
    first = timer(step)
    # Further warm-up: oneDNN on the CPU keeps getting faster over the first calls of a new shape.
    for _ in range(warmup_steps - 1):
        step()
    return Prepared(model, x, step, first)


def max_rel_err(prepared: Prepared, setting: Setting) -> float:
    """``max |out - ref| / max |ref|`` over the logits, ``ref`` being torchvision in float64 with the same
    weights, buffers and input, in the same mode (inference: eval; training: batch statistics)."""
    reference = torchvision.models.DenseNet(*MODELS[setting.model]).double().to(prepared.x.device)
    reference.load_state_dict(prepared.model.state_dict())
    training = setting.mode == "train"
    dtype = DTYPES[setting.dtype]
    with torch.no_grad():
        ref = reference.train(training)(prepared.x.double())
        with torch.autocast(prepared.x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = prepared.model.train(training)(prepared.x)
    return float((out.double() - ref).abs().max() / ref.abs().max())


def measure_time(providers: list[str], setting: Setting, repeats: int) -> list[dict]:
    timer = StepTimer(setting.torch_device)
    prepared, failed = {}, {}
    for provider in providers:
        try:
            prepared[provider] = prepare(provider, setting)
        except Exception as error:  # a row with its error; the others are measured on
            failed[provider] = describe(error)
            _release(setting.torch_device)
    times: dict[str, list[float]] = {provider: [] for provider in prepared}
    enqueued: dict[str, list[float]] = {provider: [] for provider in prepared}  # CUDA: host time to issue it
    for _ in range(repeats):
        for provider, p in list(prepared.items()):
            try:
                times[provider].append(timer(p.step))
                if timer.enqueued is not None:
                    enqueued[provider].append(timer.enqueued)
            except Exception as error:
                failed[provider] = describe(error)
                del prepared[provider]
                _release(setting.torch_device)
    rows = [setting.row(provider) | {"error": failed[provider]} for provider in providers if provider in failed]
    for provider, p in prepared.items():
        try:
            rows.append(_timed_row(provider, p, times[provider], setting, repeats, enqueued[provider]))
        except Exception as error:
            rows.append(setting.row(provider) | {"error": describe(error)})
    return rows


def _release(device: torch.device) -> None:
    """Give the memory of a failed provider back before the next one runs."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed_row(
    provider: str, p: Prepared, seconds: list[float], setting: Setting, repeats: int, enqueued: list[float]
) -> dict:
    peak_mb = _peak_mb(p, setting.torch_device) if setting.torch_device.type == "cuda" else None
    ms = sorted(t * 1e3 for t in seconds)
    median = statistics.median(ms)
    # CUDA: the host time a step took to enqueue (median), beside its GPU time
    host = {"host_ms_median": statistics.median(enqueued) * 1e3} if enqueued else {}
    quantiles = statistics.quantiles(ms, n=5, method="inclusive") if len(ms) > 1 else [median] * 4
    return (
        setting.row(provider)
        | {
            "backend": PROVIDERS[provider].backend(p.model),
            "repeats": repeats,
            "ms_median": median,
            "ms_p20": quantiles[0],
            "ms_p80": quantiles[-1],
            "ms_all": [t * 1e3 for t in seconds],
            "images_per_s": setting.batch / (median / 1e3),
            "first_step_s": p.first_step_s,
            "max_rel_err": None if PROVIDERS[provider].compile_mode else max_rel_err(p, setting),
        }
        | ({} if peak_mb is None else {"peak_mem_mb": peak_mb})
        | host
    )


def _peak_mb(prepared: Prepared, device: torch.device) -> float:
    """A step's extra peak memory; a CUDA graph's replay allocates nothing, so its warm-up and capture's."""
    if prepared.graph_peak_bytes is not None:
        return prepared.graph_peak_bytes / 2**20
    peak = PeakMemory(device)
    peak.start()
    prepared.step()
    return peak.stop() / 2**20


def measure_memory(provider: str, setting: Setting) -> dict:
    return setting.row(provider) | {"peak_mem_mb": _peak_mb(prepare(provider, setting), setting.torch_device)}


def _fits(provider: str, setting: Setting, batch: int) -> bool:
    """Whether one training step at ``batch`` fits in the device's memory; any error but running out of
    memory is raised (and ends the search with that error)."""
    try:
        prepare(provider, Setting(**(asdict(setting) | {"batch": batch})), warmup_steps=1)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        _release(setting.torch_device)


def measure_max_batch(provider: str, setting: Setting, limit: int = 1 << 14, growth: float = 2.0) -> dict:
    """The largest batch one training step of ``setting`` fits in (CUDA only), to within about 3%
    (``max_batch`` fits; ``max_batch_fails``, when found, does not): from ``setting.batch``, up by
    ``growth`` while steps fit (or down while they do not), then bisection. ``growth`` 2 searches from far
    off; near a counted estimate (``python -m fastdense fit``) 1.125 takes a probe or two. An error other
    than running out of memory ends the search: the row keeps the largest batch found so far and the error."""
    if setting.torch_device.type != "cuda":
        raise ValueError("max-batch search needs a CUDA device")
    setting = Setting(**(asdict(setting) | {"mode": "train"}))
    good, bad, error, probes = 0, None, None, 0
    batch = max(setting.batch, 1)

    def fits(b: int) -> bool:
        nonlocal probes
        probes += 1
        return _fits(provider, setting, b)

    try:
        if fits(batch):
            good = batch
            while bad is None and good < limit:  # up until a step fails
                batch = min(limit, max(good + 1, int(good * growth)))
                good, bad = (batch, None) if fits(batch) else (good, batch)
        else:
            bad = batch
            while good == 0 and bad > 1:  # down until a step fits
                batch = max(1, min(bad - 1, int(bad / growth)))
                good, bad = (batch, bad) if fits(batch) else (0, batch)
        while bad is not None and bad - good > max(1, good // 32):  # bisect to ~3%
            middle = (good + bad) // 2
            good, bad = (middle, bad) if fits(middle) else (good, middle)
    except Exception as failure:
        error = describe(failure)
    row = {"max_batch": good, "max_batch_fails": bad, "max_batch_limit_reached": bad is None and error is None,
           "max_batch_probes": probes, "max_batch_start": setting.batch}  # fmt: skip
    return setting.row(provider) | row | ({"error": error} if error else {})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", nargs="+", choices=sorted(PROVIDERS), default=[])
    parser.add_argument("--metric", choices=METRICS, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--growth", type=float, default=2.0, help="max-batch: the search's step factor")
    defaults = Setting()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    setting = Setting(**{name: getattr(args, name) for name in asdict(defaults)})
    if args.metric == "peaks":
        rows = [asdict(measure_peaks(setting.torch_device, DTYPES[setting.dtype]))]
    elif args.metric == "time":
        rows = measure_time(args.provider, setting, args.repeats)
    elif args.metric == "warm":
        rows = [setting.row(p) | {"first_step_s": prepare(p, setting, 1).first_step_s} for p in args.provider]
    elif len(args.provider) != 1:
        parser.error(f"--metric {args.metric} measures one provider per process")
    elif args.metric == "memory":
        rows = [measure_memory(args.provider[0], setting)]
    else:
        rows = [measure_max_batch(args.provider[0], setting, growth=args.growth)]
    json.dump(rows, sys.stdout)
    print()


if __name__ == "__main__":
    main()
