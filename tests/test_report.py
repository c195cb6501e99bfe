"""The main job (python -m fastdense) end to end at a small size: verification rows and benchmark rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastdense.report import format_table


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    command = [
        sys.executable, "-m", "fastdense", "--device", "cpu", "--batch", "2", "--resolution", "64",
        "--repeats", "1", "--providers", "torchvision-eager", "fastdense", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    return done.stdout, json.loads(out.read_text())


def test_verification_agrees_with_torchvision_in_float64(report):
    stdout, result = report
    rows = result["verification"]
    assert {(r["mode"], r["memory_efficient"]) for r in rows} == {
        ("train", False), ("eval", False), ("train", True), ("eval", True),
    }  # fmt: skip
    for row in rows:
        for key in ("output", "input_grad", "param_grad", "running_stats"):
            assert 0 <= row[key] <= 1e-9, row
        assert row["num_batches_tracked"] == 0.0
    assert "Verification" in stdout


def test_benchmark_rows_have_positive_time_and_memory(report):
    stdout, result = report
    rows = result["benchmark"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("torchvision-eager", "fastdense") for m in ("infer", "train")
    }
    for row in rows:
        assert row["ms_median"] > 0 and row["images_per_s"] > 0 and row["peak_mem_mb"] > 0, row
        assert row["backend"] == ("torch" if row["provider"] == "fastdense" else "torchvision")
    assert "speed vs eager" in stdout and "memory vs eager" in stdout
    assert result["environment"]["torch"]


def test_format_table_aligns_columns():
    table = format_table(["name", "value"], [["a", "1.0"], ["long name", "10.25"]], text_columns=1)
    assert table.splitlines() == ["name       value", "----------------", "a            1.0", "long name  10.25"]
