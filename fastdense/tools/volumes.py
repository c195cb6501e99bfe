"""``python -m fastdense volumes``: MONAI's 3-D DenseNets against their fastdense conversion, by volume size.

One training step (forward, cross-entropy, backward, SGD update) of MONAI's ``DenseNet121/169/201``
(``spatial_dims=3, in_channels=1, out_channels=2``, the CT/MRI classifier) on random volumes, for MONAI
eager, MONAI under ``torch.compile`` and ``fastdense.convert(model, strict=True)`` with
``memory_efficient`` off and on. Extra peak memory: each provider and volume in a fresh process, one
step after a warm-up step (the CPU's resident-set high-water mark with glibc told to hand freed blocks
back, as the main job measures, or CUDA's allocator peak, over what was in use before the step). Time:
the providers interleaved in one process per volume, median of the rounds after a warm-up step. A
table, JSON and a memory-vs-volume plot.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .measure import PeakMemory, run_worker
from .timing import StepTimer

MODELS = {
    "monai-densenet121-3d": "DenseNet121",
    "monai-densenet169-3d": "DenseNet169",
    "monai-densenet201-3d": "DenseNet201",
}
PROVIDERS = ("monai-eager", "monai-compile", "fastdense", "fastdense-memory-efficient")
CPU_VOLUMES, CUDA_VOLUMES = [64, 96, 128, 160], [64, 96, 128, 160, 192]
BASELINE = "monai-eager"


def build(provider: str, model: str, device: torch.device) -> torch.nn.Module:
    """A fresh MONAI model (seeded random weights), converted for the fastdense providers."""
    from monai.networks import nets

    import fastdense

    torch.manual_seed(0)
    net = getattr(nets, MODELS[model])(spatial_dims=3, in_channels=1, out_channels=2)
    if provider.startswith("fastdense"):
        net = fastdense.convert(net, strict=True)
        for block in net.modules():
            if isinstance(block, fastdense.FastDenseBlock):
                block.memory_efficient = provider == "fastdense-memory-efficient"
    return net.to(device).train()


def make_step(provider: str, net: torch.nn.Module, batch: int, volume: int, device: torch.device):
    """The training step on a fixed random batch of ``volume^3`` single-channel volumes."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, volume, volume, volume, generator=generator).to(device)
    target = torch.randint(0, 2, (batch,), generator=generator).to(device)
    model = torch.compile(net) if provider == "monai-compile" else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def measure_memory(provider: str, model: str, volume: int, batch: int, device: torch.device) -> float:
    """Extra peak MiB of one step after a warm-up step, in this process."""
    step = make_step(provider, build(provider, model, device), batch, volume, device)
    step()
    peak = PeakMemory(device)
    peak.start()
    step()
    return peak.stop() / 2**20


def memory_in_fresh_process(provider: str, model: str, volume: int, batch: int, device: str) -> float:
    command = [sys.executable, "-m", "fastdense", "volumes", "--memory-of", provider, "--model", model]
    command += ["--volumes", str(volume), "--batch", str(batch), "--device", device]
    return run_worker(command, memory=True, what=f"{provider} at {volume}^3")["peak_mem_mb"]


def largest_edge(fits, start: int = 64, step: int = 16, limit: int = 1024) -> int | None:
    """The largest multiple of ``step`` up to ``limit`` for which ``fits(edge)`` holds, assuming it holds
    below any edge that fits: doubling from ``start``, then bisection. None when ``start`` does not fit."""
    if not fits(start):
        return None
    low, high = start, None
    while high is None:
        edge = min(2 * low, limit)
        if edge == low:
            return low
        if fits(edge):
            low = edge
        else:
            high = edge
    while high - low > step:
        middle = (low + high) // 2 // step * step
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def largest_volume(provider: str, model: str, batch: int, device: str) -> int | None:
    """CUDA: the largest volume edge (a multiple of 16) at which ``provider`` trains a step at ``batch``,
    each try in a fresh process (an out-of-memory error ends the try, not the search)."""

    def fits(edge: int) -> bool:
        try:
            memory_in_fresh_process(provider, model, edge, batch, device)
        except RuntimeError:
            return False
        return True

    return largest_edge(fits)


def measure_times(providers, model: str, volume: int, batch: int, device: torch.device, repeats: int) -> dict:
    """Per provider: the seconds of each round, the providers interleaved, after one warm-up step each."""
    steps = {p: make_step(p, build(p, model, device), batch, volume, device) for p in providers}
    timer = StepTimer(device)
    first = {p: timer(step) for p, step in steps.items()}  # compilation, allocator warm-up
    rounds = {p: [] for p in providers}
    for _ in range(repeats):
        for p, step in steps.items():
            rounds[p].append(timer(step))
    return {p: {"first_step_s": first[p], "seconds": rounds[p]} for p in providers}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for volume in args.volumes:
        times = (
            {}
            if args.skip_time
            else measure_times(args.providers, args.model, volume, args.batch, device, args.repeats)
        )
        for provider in args.providers:
            row = {
                "model": args.model,
                "provider": provider,
                "volume": volume,
                "batch": args.batch,
                "device": args.device,
            }
            row["peak_mem_mb"] = memory_in_fresh_process(provider, args.model, volume, args.batch, args.device)
            if provider in times:
                row |= times[provider] | {"ms_median": 1e3 * statistics.median(times[provider]["seconds"])}
            rows.append(row)
            print(f"measured {provider} at {volume}^3", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["volume  provider                     ms (min-max)             speed vs MONAI  extra peak MiB  vs MONAI"]
    for row in rows:
        base = next(r for r in rows if r["volume"] == row["volume"] and r["provider"] == BASELINE)
        memory = f"{row['peak_mem_mb']:8.0f}  {row['peak_mem_mb'] / base['peak_mem_mb']:8.2f}x"
        timing = f"{'-':24} {'-':>14}"
        if "ms_median" in row and "ms_median" in base:
            ms = [1e3 * s for s in row["seconds"]]
            spread = f"({min(ms):.0f}-{max(ms):.0f})"
            timing = f"{row['ms_median']:8.0f} {spread:15} {base['ms_median'] / row['ms_median']:13.2f}x"
        lines.append(f"{row['volume']:4d}^3  {row['provider']:28} {timing}  {memory}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        points = sorted((r["volume"], r["peak_mem_mb"]) for r in rows if r["provider"] == provider)
        ax.plot(*zip(*points, strict=True), marker="o", label=provider)
    ax.set_xlabel("volume edge (voxels)")
    ax.set_ylabel("extra peak memory of a training step (MiB)")
    ax.set_title(f"{rows[0]['model']}, batch {rows[0]['batch']}, {rows[0]['device']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Options:
    """One run of the benchmark: ``volumes`` None takes the device's default edges; ``providers`` None, all."""

    model: str = "monai-densenet121-3d"
    volumes: list[int] | None = None
    batch: int = 2
    device: str = "cpu"
    providers: list[str] | None = None
    repeats: int = 3
    skip_time: bool = False
    json: str | None = None
    plot: str | None = None


def run_and_print(options: Options) -> list[dict]:
    """Measure, print the table, write the JSON and the plot where asked for; returns the rows."""
    cuda = options.device.startswith("cuda")
    options.volumes = options.volumes or (CUDA_VOLUMES if cuda else CPU_VOLUMES)
    providers = list(options.providers or PROVIDERS)
    options.providers = providers if BASELINE in providers else [BASELINE, *providers]  # ratios are against it
    rows = run(options)
    print(f"{options.model}, batch {options.batch}, training step (SGD), {options.device}")
    print(table(rows))
    if options.json:
        with open(options.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {options.json}")
    if options.plot:
        plot(rows, options.plot)
        print(f"wrote {options.plot}")
    return rows


def main(argv: list[str] | None = None) -> None:
    from . import describe

    parser = argparse.ArgumentParser(prog="python -m fastdense volumes", description=describe(__doc__))
    parser.add_argument("--model", default="monai-densenet121-3d", choices=sorted(MODELS))
    edges = f"CPU {' '.join(map(str, CPU_VOLUMES))}, CUDA {' '.join(map(str, CUDA_VOLUMES))}"
    parser.add_argument("--volumes", type=int, nargs="+", help=f"volume edges (default: {edges})")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up step")
    parser.add_argument("--skip-time", action="store_true", help="memory only")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--plot", help="write the memory-vs-volume plot to this PNG file")
    parser.add_argument("--max-volume", action="store_true", help="CUDA: the largest volume each provider trains")
    parser.add_argument("--memory-of", choices=PROVIDERS, help=argparse.SUPPRESS)  # the fresh-process worker
    args = vars(parser.parse_args(argv))
    if importlib.util.find_spec("monai") is None:
        parser.exit(
            2,
            "python -m fastdense volumes: monai is not installed; the 3-D benchmark builds MONAI's "
            "DenseNets (pip install monai, or put its wheel on PYTHONPATH: benchmarks/fetch_gpu_extras.sh)\n",
        )
    memory_of, max_volume = args.pop("memory_of"), args.pop("max_volume")
    options = Options(**args)
    if memory_of:
        volume = (options.volumes or CPU_VOLUMES)[0]
        peak = measure_memory(memory_of, options.model, volume, options.batch, torch.device(options.device))
        print(json.dumps({"peak_mem_mb": peak}))
        return
    if max_volume:
        if not options.device.startswith("cuda"):
            parser.error("--max-volume needs --device cuda (on the CPU a volume too large swaps, it does not fail)")
        for provider in options.providers or PROVIDERS:
            edge = largest_volume(provider, options.model, options.batch, options.device)
            print(f"{provider}: largest volume that trains at batch {options.batch}: {edge}^3", flush=True)
        return
    run_and_print(options)
