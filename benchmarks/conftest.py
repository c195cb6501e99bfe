"""Options of the pytest-benchmark suite (see benchmarks/test_speed.py and the README)."""

from __future__ import annotations

import torch

from fastdense.tools.providers import PROVIDERS
from fastdense.tools.timing import device_defaults


def pytest_addoption(parser):
    group = parser.getgroup("fastdense benchmarks")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")
    group.addoption("--bench-model", default="densenet121")
    group.addoption("--bench-batch", type=int, nargs="+", default=None, help="default: CUDA 64 256, CPU 2")
    group.addoption("--bench-resolution", type=int, default=None, help="default: CUDA 224, CPU 64")
    group.addoption("--bench-dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    group.addoption(
        "--bench-providers",
        nargs="+",
        choices=sorted(PROVIDERS),
        default=None,
        help="default: eager providers (torch.compile ones on CUDA too)",
    )


def bench_config(config) -> dict:
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    eager = ["torchvision-eager", "torchvision-memory-efficient", "fastdense", "fastdense-memory-efficient"]
    compiled = ["torch-compile", "torch-compile-max-autotune", "torch-compile-reduce-overhead"]
    return {
        "device": device,
        "model": config.getoption("--bench-model"),
        "batches": config.getoption("--bench-batch") or ([64, 256] if cuda else [2]),
        "resolution": config.getoption("--bench-resolution") or (224 if cuda else 64),
        "dtype": config.getoption("--bench-dtype") or device_defaults(device)["dtype"],
        "channels_last": device_defaults(device)["channels_last"],
        "providers": config.getoption("--bench-providers") or (eager + compiled if cuda else eager),
    }


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    cfg = bench_config(metafunc.config)
    cases, ids = [], []
    for provider in cfg["providers"]:
        for mode in ("infer", "train"):
            for batch in cfg["batches"]:
                cases.append((provider, mode, batch))
                ids.append(f"{provider}-{mode}-b{batch}")
    metafunc.parametrize("bench_case", cases, ids=ids)
