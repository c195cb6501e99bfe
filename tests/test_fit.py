"""Will it fit? ``fastdense.estimate_peak_memory`` (PyTorch's MemTracker on fake tensors) against the
measured extra peak of the same step on the CPU, and ``python -m fastdense fit``'s search.

The measurement is the benchmark's own: a fresh process per step, its resident-set high-water mark less
what was in use before the step (``fastdense.tools.measure``, ``fastdense.tools.volumes``). Six settings,
2-D and 3-D, training and inference, ``memory_efficient`` both ways, float32 and bf16 autocast: the
count is within 10% of the measurement in each.

Not among them: fastdense's own steps under bf16 autocast on a CPU without bf16 arithmetic (the AMD EPYC
machines: AVX2 only), where oneDNN converts bf16 operands to float32 in scratch memory of its own, which
no PyTorch tensor holds and so no tracker sees (densenet121, batch 8, 160x160: 84.8 MiB measured, 62.6
counted); on a GPU cuDNN's workspaces are the like, which ``fit``'s reserve is for.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import fastdense
from fastdense.tools import fit
from fastdense.tools.measure import run_worker
from fastdense.tools.providers import PROVIDERS

SETTINGS = [  # provider, mode, batch, resolution, autocast dtype (2-D: densenet121)
    ("fastdense", "train", 8, 160, "float32"),
    ("fastdense-memory-efficient", "train", 8, 160, "float32"),
    ("fastdense", "infer", 8, 160, "float32"),
    ("torchvision-eager", "train", 8, 160, "bfloat16"),
]


def _measured_2d(provider, mode, batch, resolution, dtype) -> float:
    command = [sys.executable, "-m", "fastdense.tools.measure", "--metric", "memory", "--provider", provider,
               "--mode", mode, "--batch", str(batch), "--resolution", str(resolution), "--dtype", dtype,
               "--device", "cpu"]  # fmt: skip
    return run_worker(command, memory=True, what=f"measuring {provider}")[0]["peak_mem_mb"] * 2**20


@pytest.mark.parametrize("setting", SETTINGS, ids=["-".join(map(str, s[:2] + s[4:])) for s in SETTINGS])
def test_the_counted_2d_peak_matches_the_measured_one(setting):
    provider, mode, batch, resolution, dtype = setting
    measured = _measured_2d(*setting)
    counted = fastdense.estimate_peak_memory(
        PROVIDERS[provider].build("densenet121"), (batch, 3, resolution, resolution), train=mode == "train",
        autocast_dtype=None if dtype == "float32" else getattr(torch, dtype), device="cpu",
    )  # fmt: skip
    assert abs(counted.extra - measured) <= 0.1 * measured, (counted, measured / 2**20)


@pytest.mark.parametrize("provider", ["fastdense", "monai-eager"])
def test_the_counted_3d_peak_matches_the_measured_one(provider):
    from fastdense.tools.volumes import build

    command = [sys.executable, "-m", "fastdense", "volumes", "--memory-of", provider, "--volumes", "64", "--batch",
               "2", "--device", "cpu"]  # fmt: skip
    measured = run_worker(command, memory=True, what=f"measuring {provider}")["peak_mem_mb"] * 2**20
    model = build(provider, "monai-densenet121-3d", torch.device("cpu"))
    counted = fastdense.estimate_peak_memory(model, (2, 1, 64, 64, 64), device="cpu")
    assert abs(counted.extra - measured) <= 0.1 * measured, (counted, measured / 2**20)


def test_the_result_is_the_peak_with_its_split_and_the_model_is_untouched():
    model = fastdense.FastDenseNet(8, (2, 2), 16, num_classes=5)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    result = fastdense.estimate_peak_memory(model, (2, 3, 32, 32), optimizer="adamw")
    assert isinstance(result, int) and int(result) == result.peak == sum(result.by_category.values())
    params, state = result.by_category["Parameter"], result.by_category["Optstate"]
    assert 0 < result.extra < result and 2 * params <= state <= 2.01 * params  # AdamW's two moments (and steps)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_fit_finds_the_largest_batch_under_the_memory_and_checks_it(tmp_path, capsys):
    """The line through two counts, the answer counted again: it fits, and 2% more does not."""
    out = tmp_path / "fit.json"
    fit.main(["--model", "densenet-tiny", "--resolution", "32", "--memory", "512MiB", "1GiB", "--reserve-gib", "0.1",
              "--providers", "torchvision-eager", "fastdense-memory-efficient", "--json", str(out),
              "--plot", str(tmp_path / "fit.png")])  # fmt: skip
    result = json.loads(out.read_text())
    setting = fit.Setting(model="densenet-tiny", resolution=32)
    for row in result["rows"]:
        for card in row["cards"]:
            limit = fit.Reserve(**result["reserve"]).limit(card["memory_bytes"])
            assert 0 < card["peak_bytes"] <= limit
            assert int(fit.count(row["provider"], setting, int(card["largest"] * 1.02) + 1)) > limit
    eager, fast = result["rows"]
    assert fast["cards"][1]["largest"] > eager["cards"][1]["largest"]
    assert "densenet-tiny training" in capsys.readouterr().out and (tmp_path / "fit.png").stat().st_size


def test_memory_sizes_and_cards():
    assert fit.parse_memory("80GiB") == fit.parse_memory("80GB") == fit.parse_memory("h100-80gb") == 80 * 2**30
    assert fit.parse_memory("16384MiB") == 16 * 2**30
    with pytest.raises(ValueError, match="memory: expected"):
        fit.parse_memory("lots")
    assert fit.Reserve(2**30, 0.1).limit(12 * 2**30) == int(11 * 2**30 / 1.1)
