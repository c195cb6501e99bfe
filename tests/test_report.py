"""The main job (python -m fastdense) end to end at a small size: verification rows and benchmark rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastdense.tools.report import REPORT_PROVIDERS
from fastdense.tools.tables import format_table


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    command = [
        sys.executable, "-m", "fastdense", "--device", "cpu", "--batch", "2", "--resolution", "64",
        "--repeats", "1", "--json", str(out),
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
    rows = result["benchmark"]["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in REPORT_PROVIDERS for m in ("infer", "train")}
    for row in rows:
        assert row["ms_median"] > 0 and row["images_per_s"] > 0 and row["peak_mem_mb"] > 0, row
        assert row["backend"] == ("torch" if row["provider"].startswith("fastdense") else "torchvision")
    assert "speed vs eager" in stdout and "memory vs eager" in stdout
    assert result["environment"]["torch"]


def test_format_table_aligns_columns():
    table = format_table(["name", "value"], [["a", "1.0"], ["long name", "10.25"]], text_columns=1)
    assert table.splitlines() == ["name       value", "----------------", "a            1.0", "long name  10.25"]


def test_tables_and_progress_without_rich(monkeypatch, capsys):
    """The GPU machine has no rich: tables fall back to plain text and progress to lines on stderr."""
    from fastdense.tools import tables

    monkeypatch.setattr(tables, "HAVE_RICH", False)
    tables.print_table("title", ["name", "value"], [["a", "1.0"]], text_columns=1)
    with tables.progress(2) as step:
        step("first")
        step("second")
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == ["title", "name  value", "-----------", "a       1.0"]
    assert err.splitlines() == ["  [1/2] first", "  [2/2] second"]


def test_command_line_tools_import_without_rich():
    code = (
        "import sys; sys.modules['rich'] = None; "
        "import fastdense.tools.bench, fastdense.tools.profile, fastdense.tools.report"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_importing_the_library_loads_none_of_the_tools():
    code = (
        "import sys, fastdense; "
        "tools = ('fastdense.tools', 'rich', 'matplotlib'); "
        "loaded = [m for m in sys.modules if m.startswith(tools)]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_help_lists_every_subcommand_and_a_typo_names_the_closest():
    from fastdense.tools import SUBCOMMANDS

    done = subprocess.run([sys.executable, "-m", "fastdense", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split("subcommands (")[1].splitlines()[1:]
    assert [line.split()[0] for line in listed if line.strip()] == list(SUBCOMMANDS)
    done = subprocess.run([sys.executable, "-m", "fastdense", "fitt"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown subcommand 'fitt' (did you mean 'fit'?)" in done.stderr


@pytest.mark.parametrize("tool", ["fit", "bench", "host", "traffic", "volumes", "profile"])
def test_each_tools_help_describes_it_in_whole_sentences(tool):
    done = subprocess.run([sys.executable, "-m", "fastdense", tool, "--help"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    description = done.stdout.split("\n\n")[1]
    assert description.startswith(f"``python -m fastdense {tool}``") and description.rstrip().endswith("."), description
