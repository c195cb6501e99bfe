"""The main job: a verification-and-benchmark report of fastdense against torchvision.

1. Verification: the chosen DenseNet in float64 with randomised BatchNorm parameters and running
   statistics, fastdense against torchvision on the same weights and inputs, train and eval mode,
   ``memory_efficient`` both ways: largest relative error of the output, the input gradient, every
   parameter gradient and the running statistics.
2. Benchmark: inference and one training step (forward, cross-entropy, backward, SGD) for torchvision
   eager, torchvision ``memory_efficient=True`` and fastdense (``fastdense.measure``): median time over
   interleaved repeats of all providers in one process, images/s, and the extra peak memory of one
   step, each provider in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
import torchvision

import fastdense

from .measure import DTYPES, MODES, PROVIDERS, WARMUP_STEPS
from .verify import compare, randomize_batchnorm

VERIFY_BATCH, VERIFY_RESOLUTION = 2, 64


def verification(model_name: str, device: torch.device) -> list[dict]:
    rows = []
    for memory_efficient in (False, True):
        torch.manual_seed(0)
        reference = getattr(torchvision.models, model_name)().double().to(device)
        randomize_batchnorm(reference)
        fast = getattr(fastdense, model_name)(memory_efficient=memory_efficient).double().to(device)
        fast.load_state_dict(reference.state_dict())
        for training, steps in ((True, 2), (False, 1)):
            inputs = [
                torch.randn(VERIFY_BATCH, 3, VERIFY_RESOLUTION, VERIFY_RESOLUTION, dtype=torch.float64, device=device)
                for _ in range(steps)
            ]
            errors = compare(fast, reference, inputs, training)
            rows.append(
                {"mode": "train" if training else "eval", "memory_efficient": memory_efficient, "steps": steps} | errors
            )
    return rows


def _measure_in_subprocess(metric: str, providers: list[str], mode: str, args: argparse.Namespace) -> list[dict]:
    command = [sys.executable, "-m", "fastdense.measure", "--metric", metric, "--provider", *providers]
    command += ["--mode", mode, "--model", args.model, "--batch", str(args.batch), "--resolution", str(args.resolution)]
    command += ["--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats)]
    if args.channels_last:
        command.append("--channels-last")
    env = dict(os.environ)
    if metric == "memory":
        # glibc then serves every block of a page or more with its own mapping and hands it back when
        # freed, so the resident set follows live memory instead of what the heap has kept.
        env |= {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {metric} of {', '.join(providers)} ({mode}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(mode: str, args: argparse.Namespace) -> list[dict]:
    """Every provider's rows for one mode: times from one process (interleaved), peaks one process each."""
    print(f"  timing {mode}: {', '.join(args.providers)} ...", file=sys.stderr, flush=True)
    rows = _measure_in_subprocess("time", args.providers, mode, args)
    for row in rows:
        print(f"  peak memory {mode}: {row['provider']} ...", file=sys.stderr, flush=True)
        (memory,) = _measure_in_subprocess("memory", [row["provider"]], mode, args)
        row["peak_mem_mb"] = memory["peak_mem_mb"]
    return rows


def format_table(headers: list[str], rows: list[list[str]], text_columns: int) -> str:
    """A plain-text table: the first ``text_columns`` columns left-aligned, the figures right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)])


def print_verification(rows: list[dict], model: str) -> None:
    size = f"batch {VERIFY_BATCH}, {VERIFY_RESOLUTION}x{VERIFY_RESOLUTION}"
    print(f"\nVerification: fastdense {model} vs torchvision, float64, {size}, random BatchNorm parameters and stats")
    print("largest relative error, ||fastdense - torchvision|| / ||torchvision||:")
    headers = ["mode", "memory_efficient", "output", "input grad", "param grad", "running stats", "counters"]
    table = [
        [r["mode"], str(r["memory_efficient"])]
        + [f"{r[key]:.1e}" for key in ("output", "input_grad", "param_grad", "running_stats")]
        + ["equal" if r["num_batches_tracked"] == 0.0 else "DIFFER"]
        for r in rows
    ]
    print(format_table(headers, table, text_columns=2))


def print_benchmark(rows: list[dict], args: argparse.Namespace) -> None:
    layout = "channels_last" if args.channels_last else "contiguous"
    print(
        f"\nBenchmark: {args.model}, batch {args.batch}, {args.resolution}x{args.resolution}, {args.dtype}, "
        f"{layout}, device {rows[0]['device_name']}, median of {args.repeats} interleaved runs "
        f"after {WARMUP_STEPS} warm-up steps"
    )
    print("peak MiB: extra peak memory of one step (peak during the step minus memory in use before it)")
    headers = ["mode", "provider", "backend", "ms", "images/s", "speed vs eager", "peak MiB", "memory vs eager"]
    table = []
    for mode in MODES:
        eager = next(r for r in rows if r["mode"] == mode and r["provider"] == "torchvision-eager")
        for r in (r for r in rows if r["mode"] == mode):
            speed = eager["ms_median"] / r["ms_median"]
            memory = r["peak_mem_mb"] / eager["peak_mem_mb"] if eager["peak_mem_mb"] > 0 else float("nan")
            times = [f"{r['ms_median']:.1f}", f"{r['images_per_s']:.1f}", f"{speed:.2f}x"]
            table.append([mode, r["provider"], r["backend"], *times, f"{r['peak_mem_mb']:.1f}", f"{memory:.2f}x"])
    print(format_table(headers, table, text_columns=3))


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fastdense": fastdense.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m fastdense", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--model", default="densenet121", choices=["densenet121", "densenet161", "densenet169", "densenet201"]
    )
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 8 on the CPU")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on the CPU"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on for CUDA, off (the default layout) on the CPU",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per measurement (default: 20 CUDA, 5 CPU)"
    )
    parser.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.batch = args.batch or (64 if on_cuda else 8)
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.channels_last = on_cuda if args.channels_last is None else args.channels_last
    args.repeats = args.repeats or (20 if on_cuda else 5)
    if "torchvision-eager" not in args.providers:
        args.providers.insert(0, "torchvision-eager")  # every ratio is against it

    env = environment()
    print("fastdense report: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None))
    result: dict = {"environment": env, "verification": [], "benchmark": []}
    if not args.skip_verify:
        result["verification"] = verification(args.model, torch.device(args.device))
        print_verification(result["verification"], args.model)
    if not args.skip_bench:
        for mode in MODES:
            result["benchmark"] += benchmark(mode, args)
        print_benchmark(result["benchmark"], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
