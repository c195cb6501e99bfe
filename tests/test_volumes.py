"""``python -m fastdense volumes``: the 3-D benchmark's providers and its output (sizes too small to time)."""

from __future__ import annotations

import json

import pytest
import torch

import fastdense
from fastdense.tools import volumes


def test_the_fastdense_providers_are_the_converted_monai_model():
    monai_keys = volumes.build("monai-eager", "monai-densenet121-3d", torch.device("cpu")).state_dict().keys()
    for provider, efficient in (("fastdense", False), ("fastdense-memory-efficient", True)):
        net = volumes.build(provider, "monai-densenet121-3d", torch.device("cpu"))
        blocks = [m for m in net.modules() if isinstance(m, fastdense.FastDenseBlock)]
        assert len(blocks) == 4 and all(b.memory_efficient == efficient for b in blocks)
        assert net.state_dict().keys() == monai_keys


def test_the_command_measures_every_provider_and_volume(tmp_path, capsys):
    out, png = tmp_path / "volumes.json", tmp_path / "volumes.png"
    args = ["--volumes", "32", "--batch", "2", "--repeats", "1", "--providers", "fastdense", "--device", "cpu"]
    volumes.main([*args, "--json", str(out), "--plot", str(png)])
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["monai-eager", "fastdense"]  # the baseline is always measured
    assert all(r["peak_mem_mb"] > 0 and r["ms_median"] > 0 and len(r["seconds"]) == 1 for r in rows)
    printed = capsys.readouterr().out
    assert "monai-densenet121-3d, batch 2" in printed and "fastdense" in printed
    assert png.stat().st_size > 0


def test_the_benchmark_takes_a_3d_model(monkeypatch):
    """``--model monai-densenet121-3d`` in ``python -m fastdense bench`` runs the volumes benchmark with
    its options (the edge from --resolution); a 2-D provider is refused by name."""
    from fastdense.tools import bench

    runs = []
    monkeypatch.setattr(volumes, "run_and_print", runs.append)
    bench.main(["--model", "monai-densenet121-3d", "--resolution", "96", "--batch", "4", "--repeats", "2",
                "--providers", "monai-compile", "fastdense", "--device", "cpu", "--plot", "v.png"])  # fmt: skip
    providers = ["monai-compile", "fastdense"]
    assert runs == [volumes.Options("monai-densenet121-3d", [96], 4, "cpu", providers, 2, plot="v.png")]
    with pytest.raises(SystemExit):
        bench.main(["--model", "monai-densenet121-3d", "--providers", "torchvision-eager"])


def test_the_report_verifies_a_3d_conversion_against_monai(capsys):
    from fastdense.tools import report

    report.main(["--model", "monai-densenet121-3d", "--skip-bench", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "vs MONAI, float64, batch 3, 32^3" in printed and "DIFFER" not in printed
    rows = [line.split() for line in printed.splitlines() if line.startswith(("train", "eval"))]
    errors = [float(word) for row in rows for word in row[2:6]]
    assert len(rows) == 4 and max(errors) <= 1e-9, printed


def test_the_largest_volume_search():
    """Doubling, then bisection on multiples of 16; None when the smallest edge does not fit."""
    for largest in (64, 100, 130, 200, 1000):
        assert volumes.largest_edge(lambda edge, largest=largest: edge <= largest) == largest // 16 * 16
    assert volumes.largest_edge(lambda edge: False) is None
    assert volumes.largest_edge(lambda edge: True) == 1024
