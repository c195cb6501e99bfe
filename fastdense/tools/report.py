"""The main job, ``python -m fastdense``: a verification-and-benchmark report against torchvision.

1. Verification: the chosen DenseNet in float64 with randomised BatchNorm parameters and running
   statistics, fastdense against torchvision on the same weights and inputs, train and eval mode,
   ``memory_efficient`` both ways: largest relative error of the output, the input gradient, every
   parameter gradient and the running statistics.
2. Benchmark (``fastdense.tools.bench`` with the report's providers): inference and one training step for
   torchvision eager, torchvision ``memory_efficient=True`` and fastdense, time, images/s and extra
   peak memory. ``python -m fastdense bench`` has every provider and option.
"""

from __future__ import annotations

import argparse

import torch

from . import bench
from .providers import PROVIDERS
from .tables import format_table
from .timing import default_device
from .verify import compare, randomize_batchnorm

VERIFY_BATCH, VERIFY_RESOLUTION = 2, 64
# 3-D: batch 3, so that block 4 (at 1^3 from 32^3) normalises 3 values per channel: with 2 each is +-1 whatever
# the input, and its input gradient is rounding noise, whose relative error says nothing.
VOLUME_VERIFY_BATCH, VERIFY_VOLUME = 3, 32
REPORT_PROVIDERS = ["torchvision-eager", "torchvision-memory-efficient", "fastdense", "fastdense-memory-efficient"]
CUDA_REPORT_PROVIDERS = [  # added on a GPU
    "fastdense-triton", "fastdense-triton-memory-efficient",
    "torchvision-cuda-graph", "fastdense-cuda-graph", "fastdense-triton-cuda-graph",
]  # fmt: skip


def _torchvision_pair(model_name: str, device: torch.device, memory_efficient: bool):
    """fastdense's ``model_name`` and torchvision's on the same weights, float64, randomised BatchNorm."""
    torch.manual_seed(0)
    reference = PROVIDERS["torchvision-eager"].build(model_name).double().to(device)
    randomize_batchnorm(reference)
    fast = PROVIDERS["fastdense-memory-efficient" if memory_efficient else "fastdense"].build(model_name)
    fast = fast.double().to(device)
    fast.load_state_dict(reference.state_dict())
    return fast, reference


def _monai_pair(model_name: str, device: torch.device, memory_efficient: bool):
    """A MONAI 3-D model (float64, randomised BatchNorm) and ``fastdense.convert`` of a copy of it."""
    import copy

    import fastdense

    from . import volumes

    reference = volumes.build("monai-eager", model_name, device).double()
    randomize_batchnorm(reference)
    fast = fastdense.convert(copy.deepcopy(reference), strict=True)
    for block in fast.modules():
        if isinstance(block, fastdense.FastDenseBlock):
            block.memory_efficient = memory_efficient
    return fast, reference


def verification(model_name: str, device: torch.device) -> list[dict]:
    """fastdense against torchvision (a MONAI 3-D model: its conversion against MONAI), float64, both
    ``memory_efficient`` settings, two training steps and one eval step on random inputs."""
    if model_name in bench.VOLUME_MODELS:
        pair, shape = _monai_pair, (VOLUME_VERIFY_BATCH, 1, VERIFY_VOLUME, VERIFY_VOLUME, VERIFY_VOLUME)
    else:
        pair, shape = _torchvision_pair, (VERIFY_BATCH, 3, VERIFY_RESOLUTION, VERIFY_RESOLUTION)
    rows = []
    for memory_efficient in (False, True):
        fast, reference = pair(model_name, device, memory_efficient)
        for training, steps in ((True, 2), (False, 1)):
            inputs = [torch.randn(shape, dtype=torch.float64, device=device) for _ in range(steps)]
            errors = compare(fast, reference, inputs, training)
            mode = "train" if training else "eval"
            rows.append({"mode": mode, "memory_efficient": memory_efficient, "steps": steps} | errors)
    return rows


def print_verification(rows: list[dict], model: str) -> None:
    size = f"batch {VERIFY_BATCH}, {VERIFY_RESOLUTION}x{VERIFY_RESOLUTION}"
    reference = "torchvision"
    if model in bench.VOLUME_MODELS:
        size, reference = f"batch {VOLUME_VERIFY_BATCH}, {VERIFY_VOLUME}^3", "MONAI"
    print(f"\nVerification: fastdense {model} vs {reference}, float64, {size}, random BatchNorm parameters and stats")
    print(f"largest relative error, ||fastdense - {reference}|| / ||{reference}||:")
    headers = ["mode", "memory_efficient", "output", "input grad", "param grad", "running stats", "counters"]
    table = [
        [r["mode"], str(r["memory_efficient"])]
        + [f"{r[key]:.1e}" for key in ("output", "input_grad", "param_grad", "running_stats")]
        + ["equal" if r["num_batches_tracked"] == 0.0 else "DIFFER"]
        for r in rows
    ]
    print(format_table(headers, table, text_columns=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    from . import subcommands_help

    parser = argparse.ArgumentParser(
        prog="python -m fastdense",
        description=__doc__.splitlines()[0],
        epilog=subcommands_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    note = f"default: {' '.join(REPORT_PROVIDERS)} (on CUDA also {' '.join(CUDA_REPORT_PROVIDERS)})"
    bench.add_arguments(parser, default_providers_note=note)
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args(argv)
    device = default_device(args.device)
    env = bench.environment()
    print("fastdense report: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None))
    result: dict = {"environment": env, "verification": [], "benchmark": None}
    if not args.skip_verify:
        result["verification"] = verification(args.model, torch.device(device))
        print_verification(result["verification"], args.model)
    if args.model in bench.VOLUME_MODELS:  # a MONAI 3-D model: the volumes benchmark (its own --json)
        if not args.skip_bench:
            bench.volume_benchmark(parser, args)
        return
    if not args.skip_bench:
        default_providers = REPORT_PROVIDERS + (CUDA_REPORT_PROVIDERS if device.startswith("cuda") else [])
        result["benchmark"] = bench.run(bench.plan_from_args(args, default_providers=default_providers))
        bench.print_table(result["benchmark"])
    if args.json:
        bench.write_json(result, args.json)
        print(f"\nwrote {args.json}")
