"""The benchmark CLI (python -m fastdense bench), its plots, the roofline model and the profiler CLI."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastdense
from fastdense.tools.measure import Setting, measure_max_batch, prepare
from fastdense.tools.providers import MODELS, PROVIDERS
from fastdense.tools.roofline import inference_work


def run_cli(*args: str, timeout: int = 900) -> str:
    done = subprocess.run([sys.executable, "-m", "fastdense", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    """The issue's CPU command, at its size: every eager provider, both modes, JSON and plots."""
    folder = tmp_path_factory.mktemp("bench")
    stdout = run_cli(
        "bench", "--device", "cpu", "--model", "densenet121", "--batch", "2", "--resolution", "64",
        "--mode", "both", "--repeats", "2", "--json", str(folder / "out.json"), "--plot", str(folder / "out.png"),
        "--providers", "torchvision-eager", "torchvision-memory-efficient", "fastdense", "fastdense-memory-efficient",
    )  # fmt: skip
    return stdout, json.loads((folder / "out.json").read_text()), folder / "out.png"


def test_bench_rows_for_every_provider_and_mode(bench_result):
    stdout, result, _ = bench_result
    rows = result["rows"]
    providers = {"torchvision-eager", "torchvision-memory-efficient", "fastdense", "fastdense-memory-efficient"}
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in providers for m in ("infer", "train")}
    assert result["complete"]
    for row in rows:
        assert row["ms_median"] > 0 and row["ms_p20"] <= row["ms_median"] <= row["ms_p80"], row
        assert row["images_per_s"] > 0 and row["peak_mem_mb"] > 0, row
        assert row["device_name"] == "cpu" and row["first_step_s"] > 0
        assert row["torch"] == torch.__version__ and row["commit"]
        if row["provider"].startswith("fastdense"):
            assert row["backend"] == "torch"
            assert row["max_rel_err"] <= 1e-4, row
        if row["mode"] == "infer":
            assert 0 < row["roofline_fraction"] < 1, row
        paired = [base / t for base, t in zip(_baseline(rows, row)["ms_all"], row["ms_all"], strict=True)]
        assert min(paired) <= row["speed_vs_eager_p20"] <= row["speed_vs_eager"] <= row["speed_vs_eager_p80"]
        assert row["speed_vs_eager_p80"] <= max(paired), row
    assert result["environment"]["torch"] and result["environment"]["commit"]
    assert result["peaks"]["matmul_flops"] > 0 and result["peaks"]["copy_bytes_per_s"] > 0
    assert "speed vs eager" in stdout and "fastdense-memory-efficient" in stdout


def _baseline(rows: list[dict], row: dict) -> dict:
    return next(r for r in rows if r["provider"] == "torchvision-eager" and r["mode"] == row["mode"])


def test_speed_against_eager_is_the_median_of_per_round_ratios():
    """Round by round, not the ratio of the medians: here the machine slows down over the rounds and one round
    of the other provider runs fast, so its median round is a faster one than eager's and the ratio of the
    medians says 1.8x where four rounds of five say 1.2x."""
    from fastdense.tools.bench import add_speedups

    eager = [100.0, 200.0, 300.0, 400.0, 500.0]
    other = [t / 1.2 for t in eager[:2]] + [100.0 / 1.2] + [t / 1.2 for t in eager[3:]]  # round 3: 3.6x
    rows = [
        {"provider": "torchvision-eager", "mode": "train", "batch": 8, "ms_all": eager},
        {"provider": "fastdense", "mode": "train", "batch": 8, "ms_all": other},
        {"provider": "fastdense", "mode": "infer", "batch": 8, "ms_all": other},  # no eager row: no ratio
    ]
    assert statistics.median(eager) / statistics.median(other) == pytest.approx(1.8)
    add_speedups(rows)
    assert rows[0]["speed_vs_eager"] == 1.0
    assert rows[1]["speed_vs_eager"] == pytest.approx(1.2)
    assert rows[1]["speed_vs_eager_p20"] == pytest.approx(1.2) and rows[1]["speed_vs_eager_p80"] > 1.2
    assert "speed_vs_eager" not in rows[2]


def test_bench_plot_renders(bench_result):
    import matplotlib.image

    image = matplotlib.image.imread(bench_result[2])
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_torch_compile_providers(tmp_path):
    """torch.compile of torchvision and of fastdense, on a tiny model so that compiling stays quick."""
    out = tmp_path / "compile.json"
    run_cli(
        "bench", "--device", "cpu", "--model", "densenet-tiny", "--batch", "2", "--resolution", "32",
        "--mode", "infer", "--repeats", "2", "--providers", "torch-compile", "fastdense-compile",
        "--json", str(out),
    )  # fmt: skip
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torchvision-eager", "torch-compile", "fastdense-compile"}  # baseline always measured
    for name, backend in (("torch-compile", "torchvision+inductor"), ("fastdense-compile", "torch+inductor")):
        compiled = rows[name]
        assert compiled["backend"] == backend and compiled["ms_median"] > 0
        assert compiled["first_step_s"] > compiled["ms_median"] / 1e3  # compilation is reported apart


def test_profile_prints_tables_and_writes_a_trace(tmp_path):
    trace = tmp_path / "trace.json"
    stdout = run_cli(
        "profile", "--device", "cpu", "--model", "densenet-tiny", "--batch", "2", "--resolution", "32",
        "--steps", "1", "--trace", str(trace),
    )  # fmt: skip
    assert "operators (self time)" in stdout and "aten::mm" in stdout
    for stage in ("fastdense.gemm", "fastdense.conv", "fastdense.stats", "fastdense.finalize"):
        assert stage in stdout
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "fastdense.gemm_backward" for e in events)


@pytest.mark.parametrize("model", ["densenet121", "densenet-tiny"])
@pytest.mark.parametrize("resolution", [224, 97])
def test_roofline_macs_match_the_model(model, resolution):
    """The roofline's MAC count equals what the fastdense model's convolutions and classifier execute."""
    net = PROVIDERS["fastdense"].build(model).eval()
    macs = 0

    # Hooked, a transition runs torchvision's way (conv, then pool); unhooked it pools first: a quarter of the rows.
    pooled_first = {id(m.conv) for m in net.modules() if isinstance(m, fastdense.Transition)}

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            n, c, h, w = output.shape
            rows = n * c * (h // 2) * (w // 2) if id(module) in pooled_first else output.numel()
            macs += rows * module.in_channels * k // module.groups
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(count)
    # Hooked, the blocks run their layers as modules (fastdense.observed): every convolution is counted.
    with torch.no_grad():
        net(torch.randn(1, 3, resolution, resolution))
    assert inference_work(model, 1, resolution, 2).macs == macs
    assert MODELS[model][1] == tuple(len(b) for b in net.dense_blocks())


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if PROVIDERS[p].cuda_graph])
def test_cuda_graph_providers_say_they_need_cuda(provider):
    with pytest.raises(ValueError, match=f"{provider} captures CUDA graphs: it needs a CUDA device, not cpu"):
        prepare(provider, Setting(model="densenet-tiny", batch=2, resolution=32, device="cpu"))


def test_max_batch_search_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        measure_max_batch("fastdense", Setting(device="cpu"))


def test_roofline_fraction_is_only_reported_where_the_floor_is_a_bound():
    from fastdense.tools.bench import _add_roofline
    from fastdense.tools.roofline import Peaks

    peaks = Peaks(matmul_flops=1e12, copy_bytes_per_s=1e11)
    floor_ms = peaks.floor_seconds(inference_work("densenet121", 8, 224, 4)) * 1e3
    for ms, reported in ((floor_ms * 2, True), (floor_ms * 0.9, False)):
        row = {"mode": "infer", "ms_median": ms, "dtype": "float32", "model": "densenet121", "batch": 8}
        row["resolution"] = 224
        _add_roofline(row, peaks)
        assert row["roofline_floor_ms"] == floor_ms
        assert ("roofline_fraction" in row) == reported and row.get("roofline_fraction", 0) <= 1.0
