"""pytest-benchmark suite: one step (inference or training) of each provider, grouped by model, batch,
dtype and mode. Peak memory, backend and device go into each benchmark's ``extra_info``.

Run: ``.venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-autosave``; compare two saved
runs with ``.venv/bin/pytest-benchmark compare 0001 0002 --group-by=group``. Without
``--benchmark-enable`` (as in CI) every case runs once, untimed: a smoke test that keeps the suite alive.
"""

from __future__ import annotations

import torch

from fastdense.tools.measure import PeakMemory, Setting, prepare
from fastdense.tools.providers import PROVIDERS

from .conftest import bench_config


def test_step(benchmark, bench_case, request):
    provider, mode, batch = bench_case
    cfg = bench_config(request.config)
    setting = Setting(
        model=cfg["model"],
        mode=mode,
        batch=batch,
        resolution=cfg["resolution"],
        dtype=cfg["dtype"],
        device=cfg["device"],
        channels_last=cfg["channels_last"],
    )
    if not PROVIDERS[provider].available(setting.torch_device):
        import pytest

        pytest.skip(f"{provider} runs on CUDA only")
    prepared = prepare(provider, setting)
    cuda = setting.torch_device.type == "cuda"

    def step():
        prepared.step()
        if cuda:  # time the work, not its launch
            torch.cuda.synchronize()

    peak = PeakMemory(setting.torch_device)
    peak.start()
    step()
    benchmark.extra_info.update(
        provider=provider,
        backend=PROVIDERS[provider].backend(prepared.model),
        device=torch.cuda.get_device_name() if cuda else "cpu",
        peak_mem_mb=peak.stop() / 2**20,
        peak_mem_note="exact on CUDA; on the CPU an in-process resident-set delta (allocator reuse hides some)",
        first_step_s=prepared.first_step_s,
    )
    benchmark.group = f"{setting.model}-{mode}-batch{batch}-{setting.dtype}"
    benchmark.pedantic(step, rounds=10 if cuda else 3, iterations=1, warmup_rounds=1)
