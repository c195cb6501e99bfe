"""The GPU check's plumbing, rehearsed on the CPU: what a GPU run would leave in OUTDIR, and how it fails.

``benchmarks/gpu_check.sh --rehearse OUTDIR`` runs every stage of the real check with a CPU stand-in
(tiny sizes) under the same time limits, ``timeout -k``, per-provider failure rows, archive and summary,
plus a stage that fails and one that ignores SIGTERM past its limit. The device tool brings back at most
8 files, at most two folders deep: this checks what OUTDIR holds after such a run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args, cwd=ROOT, timeout=400):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER_COUNT")}
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    done = _run("--rehearse", str(out))
    return out, done


def _stage_rows(summary: str) -> dict[str, list[str]]:
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        fields = line.split()
        rows[fields[0]] = fields
    return rows


def test_rehearsal_leaves_a_summary_and_one_archive_within_the_return_limits(rehearsal):
    out, done = rehearsal
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["results.tar.gz", "summary.txt"], done.stdout + done.stderr
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)  # two folders deep at most
    assert all(p.stat().st_size < 16 * 2**20 for p in files)
    summary = (out / "summary.txt").read_text()
    assert done.stdout.rstrip().endswith(summary.rstrip()), "the summary is printed last"
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    for stage, row in _stage_rows(summary).items():
        assert f"results/{stage}.log" in names or row[3] == "SKIPPED", stage
    for bench in ("headline-train", "headline-infer", "headline-compile", "headline-graphs"):
        assert f"results/{bench}.json" in names
    assert "results/kernels.json" in names and "results/traffic.json" in names and "results/host.json" in names


def test_the_summary_prints_each_steps_counted_floor_beside_its_measured_time(rehearsal):
    """The traffic stage counts the headline's steps (the rehearsal: its tiny float32 ones); the summary's
    benchmark rows carry that roofline floor in the column after the measured milliseconds."""
    out, _ = rehearsal
    section = (out / "summary.txt").read_text().split("== headline-train\n")[1].split("\n\n")[0].splitlines()
    assert section[0].split()[3:6] == ["ms", "host", "floor"], section[0]
    rows = {line.split()[2]: line.split() for line in section[1:] if line.startswith("train")}
    for provider in ("torchvision-eager", "fastdense"):  # the rehearsal's triton row is its failing provider
        assert float(rows[provider][5]) > 0 and float(rows[provider][3]) > 0, rows  # floor, measured ms
        assert rows[provider][4] == "-"  # no GPU to enqueue on: the host column is the GPU's enqueue time
    assert "a floor, never a time" in "\n".join(section)


def test_the_host_stage_measures_host_time_with_a_stub_driver(rehearsal):
    """The host stage (``python -m fastdense host``, background): each provider's host time on the CPU,
    the triton backend's Triton launches going through a stub CUDA driver."""
    out, _ = rehearsal
    section = (out / "summary.txt").read_text().split("== host\n")[1].split("\n\n")[0]
    assert "torchvision-eager" in section and "fastdense-triton" in section and "stub CUDA driver" in section
    triton = next(line for line in section.splitlines() if "fastdense-triton" in line)
    assert "0 Triton launches" not in triton, section
    for line in section.splitlines()[:2]:  # a step's measured part: positive, and at most the whole step
        fields = line.split()
        assert fields[2] == "host" and 0 < float(fields[6]) <= float(fields[3]), section


def test_rehearsal_goes_on_past_a_failing_stage_a_cut_stage_and_a_failing_provider(rehearsal):
    out, done = rehearsal
    assert done.returncode == 1, done.stdout + done.stderr  # a stage failed, so the run says so
    summary = (out / "summary.txt").read_text()
    rows = _stage_rows(summary)
    assert rows["rehearse-fails"][3] == "FAILED"
    assert rows["rehearse-cut"][3] == "CUT" and "ignored SIGTERM" in " ".join(rows["rehearse-cut"])
    assert 8 <= int(rows["rehearse-cut"][2]) <= 16  # its 8 s limit and the 5 s before SIGKILL
    stages = list(rows)
    assert stages.index("headline-infer") > stages.index("rehearse-cut")
    for stage in ("environment", "correctness", "headline-train", "headline-infer", "headline-compile", "kernels"):
        assert rows[stage][3] == "ok", (stage, summary)
    # The triton provider cannot run on the CPU: a row with its error, the other providers measured.
    train = summary.split("== headline-train")[1].split("==")[0]
    assert "fastdense-triton" in train and "FAILED: process failed: RuntimeError: backend='triton'" in train
    assert "torchvision-eager" in train and " fastdense " in train
    assert "passed" in summary.split("== correctness")[1].split("==")[0]


@pytest.mark.parametrize("args", [["--anything"], [], ["a", "b"], ["--budget", "x", "out"]])
def test_a_bad_argument_stops_it_with_a_usage_line(tmp_path, args):
    done = _run(*args, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "usage: benchmarks/gpu_check.sh" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written where it was started


def test_an_outdir_that_cannot_be_made_stops_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = _run(str(blocker / "out"), cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "cannot create or enter OUTDIR" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_stages_past_the_budget_are_skipped_and_limits_shrink_to_what_is_left(tmp_path):
    from benchmarks import gpu_check

    run = gpu_check.Run(tmp_path, budget=26, rehearse=True)
    quick = gpu_check.Stage("quick", 100, [sys.executable, "-c", "import time; time.sleep(2)"])
    run.run_stage(quick)  # leaves 26 - 2 - KILL_AFTER_S = 19 s, under MIN_STAGE_S
    run.run_stage(gpu_check.Stage("late", 100, [sys.executable, "-c", "print('never')"]))
    first, second = run.rows
    assert first["status"] == "ok" and first["limit"] <= 26 - gpu_check.KILL_AFTER_S
    assert second["status"] == "SKIPPED" and not (run.results / "late.log").exists()


def test_the_real_stages_fit_the_budget_in_order_of_value():
    """The plan itself: the headline comparison (correctness, then the training, inference and torch.compile
    comparisons) ends within the first 300 s even if every stage before it takes its whole limit and the
    5 s before SIGKILL; the background compile it waits for has the time to finish before it."""
    from benchmarks import gpu_check

    stages = gpu_check.stages()
    foreground = [stage.name for stage in stages if not stage.background]
    headline = ["environment", "correctness", "headline-train", "headline-infer", "headline-compile"]
    assert foreground[:5] == headline
    limits = {stage.name: stage.limit for stage in stages}
    assert sum(limits[name] + gpu_check.KILL_AFTER_S for name in headline) <= 300, limits
    warm = next(stage for stage in stages if stage.background)
    assert warm.name == "warm-compile" and stages.index(warm) == 1
    assert next(s for s in stages if s.name == "headline-compile").waits_for == "warm-compile"
    assert all(stage.limit <= 200 for stage in stages)


def test_the_plan_counts_compiles_and_trials_through_the_shared_caches():
    """benchmarks/gpu_plan.py: a tuned step tunes each key once and compiles every configuration; the same
    step again costs nothing (the caches are shared); a fixed step compiles first configurations only."""
    from benchmarks import gpu_plan

    caches = gpu_plan.Caches()
    tuned = gpu_plan.Workload("fastdense-triton", "train", 2, model="densenet-tiny")
    launches, compiles, trials = caches.add(tuned)
    assert launches > 20 and compiles > 10 and trials >= compiles
    assert caches.add(tuned) == (launches, 0, 0)
    fixed = gpu_plan.Caches()
    _, fixed_compiles, fixed_trials = fixed.add(gpu_plan.Workload("fastdense-triton", "train", 2, tuned=False,
                                                                  model="densenet-tiny"))  # fmt: skip
    assert fixed_trials == 0 and 0 < fixed_compiles < compiles
