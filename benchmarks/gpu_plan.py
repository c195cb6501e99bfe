"""The GPU check's time plan, counted: each stage's limit beside its estimated need on an H200.

``PYTHONPATH=. python benchmarks/gpu_plan.py`` (about five minutes on two cores). Counts, not times: the
Triton kernel launches each stage makes are recorded as a GPU would make them: the benchmarked steps on
fake tensors (``fastdense.tools.traffic.step_launches``), the kernel microbenchmark's cases on fake
tensors, and the small-shape test files run in the Triton interpreter. From them, with the compile and
tuning caches the stages share (``TRITON_CACHE_DIR``, ``TRITON_CACHE_AUTOTUNING=1``), come the
configurations each stage compiles first and the tuning trials it runs. The estimate multiplies the counts
by the unit costs in ``UNITS``, each with where it comes from; none of them was measured on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_check

# seconds per unit, and where the figure comes from
UNITS = {
    "process": (6.0, "a Python process importing torch, torchvision, triton and fastdense: 3.4-4.0 s measured on "
                "the CPU machines, plus 2 s assumed for the CUDA context"),
    "compile": (0.52, "one Triton configuration compiled for sm_90: the mean of compile_for_hopper.py --all with "
                "triton 3.6 on a CPU machine (2 cores of an AMD EPYC), fresh cache, 211 configurations"),
    "trial": (0.05, "one tuning trial: kernels.launch's 5 ms warm-up and 20 ms of timed repetitions, Triton's "
              "five estimating runs, the L2 flush and argument restores (Triton's defaults cost 0.13 s)"),
    "inductor-train": (122.4, "torch.compile of torchvision's densenet121, a training step's graphs: measured on "
                       "the CPU machine (Inductor's CPU backend; the GPU backend runs the same Python passes)"),
    "inductor-infer": (52.7, "the same, the inference graph"),
    "inductor-cached": (4.4, "a compiled graph loaded from Inductor's cache in a new process (densenet121, "
                        "measured on the CPU machine)"),
    "inductor-fastdense-infer": (20.2, "torch.compile of fastdense's densenet121 (the stem, transitions and head "
                                 "around the block operators), inference, on the CPU machine beside another job"),
    "count": (6.0, "one counted step of densenet121 on fake tensors (fastdense.estimate_peak_memory): 4-11 s "
              "measured on the CPU machine"),
    "step": (0.1, "one training step of densenet121 at batch 256, bf16 (3x the counted floor of torchvision "
             "eager's: 35 GB at 4.3 TB/s); smaller steps scale with the batch, inference is a third"),
}  # fmt: skip


def cost(unit: str) -> float:
    return UNITS[unit][0]


@dataclass
class Workload:
    """Steps of one triton-backend provider that a stage runs (compiles and tuning come from them)."""

    provider: str
    mode: str
    batch: int
    dtype: str = "bfloat16"
    tuned: bool = True
    model: str = "densenet121"


@dataclass
class Need:
    processes: int = 0
    workloads: list[Workload] = field(default_factory=list)
    # Inductor graphs, "train", "infer" (compiled cold) or "cached", per chain of processes run side by side
    # (a stage's wall time is its longest chain's; each graph in a chain is a process of its own there)
    inductor: list[list[str]] = field(default_factory=list)
    steps: float = 0.0  # in batch-256 training steps
    note: str = ""
    tests: list[str] = field(default_factory=list)  # pytest files whose launches are recorded in the interpreter
    counts: int = 0  # counted steps on fake tensors (``python -m fastdense fit``)
    kernel_bench: bool = False  # the kernel microbenchmark's launches (``python -m fastdense kernels``)


def _bench_steps(providers: int, batches: list[int], modes: list[str], repeats: int = 10) -> float:
    """Steps of a benchmark process per provider: 3 warm-up, the timed rounds, one for peak memory, two for
    max_rel_err (torchvision in float64 counted as two), in batch-256 training steps."""
    per_provider = 3 + repeats + 1 + 2
    return sum(per_provider * providers * b / 256 * (1 if m == "train" else 1 / 3) for b in batches for m in modes)


TRITON = ["fastdense-triton", "fastdense-triton-memory-efficient"]
BOTH = ["train", "infer"]


def needs() -> dict[str, Need]:
    """What each stage of ``gpu_check.stages()`` runs, counted from its command line."""
    return {
        "environment": Need(processes=1),
        "fit": Need(processes=1, counts=12, note="CPU only: 4 providers, 3 counts each"),
        "traffic": Need(processes=1, counts=6, note="CPU only: 6 providers, 2 modes, 2 batches; a quarter count each"),
        "host": Need(processes=7, counts=2, note="CPU only: 6 processes with a stub CUDA driver (Triton's compiled "
                     "kernels from the shared cache), the counted floors"),
        "warm-compile": Need(inductor=[["train"], ["train"], ["infer", "infer"]], steps=1.25 + 1 / 3 * 1.25,
                             note="three chains of processes beside the stages below"),
        "correctness": Need(
            processes=1,
            workloads=[Workload("fastdense-triton", m, 32, d, False) for m in BOTH for d in ("bfloat16", "float32")],
            steps=8 * 2 * 3 * 32 / 256 * 3,  # 8 cases, 2 seeds, 3 models; fp64 references: 3x
        ),
        "headline-train": Need(
            processes=3, workloads=[Workload(p, "train", b) for p in TRITON for b in (64, 256)],
            steps=_bench_steps(6, [64, 256], ["train"]),
        ),
        "headline-infer": Need(
            processes=3, workloads=[Workload(p, "infer", b) for p in TRITON for b in (64, 256)],
            steps=_bench_steps(6, [64, 256], ["infer"]),
        ),
        "headline-compile": Need(processes=4, inductor=[["cached"] * 4], steps=_bench_steps(2, [64, 256], BOTH)),
        "headline-graphs": Need(
            processes=3, workloads=[Workload("fastdense-triton-cuda-graph", m, b) for m in BOTH for b in (64, 256)],
            steps=_bench_steps(4, [64, 256], BOTH), note="3 warm-up steps and a capture per provider",
        ),
        "kernels": Need(processes=1, kernel_bench=True, steps=4),
        "max-batch": Need(
            processes=4, workloads=[Workload("fastdense-triton", "train", 512, tuned=False)],
            steps=4 * 3 * 20, note="4 providers, about 3 probes each from the counted batch (2000-11000)",
        ),
        "gpu-tests": Need(processes=1, workloads=[Workload("fastdense-triton", "train", 8, tuned=False, model=m)
                                                    for m in ("densenet121", "densenet161")], steps=40),
        "graphs": Need(processes=1, steps=10),
        "volumes-128": Need(processes=4, steps=3 * 5 * 4),
        "small-shapes": Need(processes=1, tests=["tests/test_kernels.py", "tests/test_kernel_configs.py"]),
        "compile-triton": Need(processes=2, workloads=[Workload("fastdense-triton", "infer", 256)],
                               inductor=[["fastdense-infer"]], steps=_bench_steps(2, [256], ["infer"])),
        "bench-densenet201": Need(processes=3, workloads=[Workload("fastdense-triton", m, 64, model="densenet201")
                                                           for m in BOTH], steps=_bench_steps(3, [64], BOTH)),
    }  # fmt: skip


class Caches:
    """What earlier stages left in the shared compile and tuning caches."""

    def __init__(self) -> None:
        self.compiled: set = set()
        self.tuned: set = set()

    def add(self, workload: Workload) -> tuple[int, int, int]:
        """(launches, configurations compiled first, tuning trials) of one workload's step."""
        from fastdense.tools.traffic import step_launches

        launches = step_launches(workload.provider, workload.model, workload.mode, workload.batch, 224, workload.dtype)
        return self.add_launches(launches, workload.tuned)

    def add_launches(self, launches, tuned: bool) -> tuple[int, int, int]:
        compiles = trials = 0
        for launch in launches:
            configs = launch.configs if tuned else launch.configs[:1]
            if tuned and (launch.kernel, launch.key) not in self.tuned and len(configs) > 1:
                self.tuned.add((launch.kernel, launch.key))
                trials += len(configs)
            for config in configs:
                variant = (launch.kernel, launch.variant, str(config))
                if variant not in self.compiled:
                    self.compiled.add(variant)
                    compiles += 1
        return len(launches), compiles, trials


def plan() -> list[dict]:
    caches, rows, start = Caches(), [], 0.0
    for stage in gpu_check.stages():
        need = needs()[stage.name]
        launches = compiles = trials = 0
        counted = [caches.add(workload) for workload in need.workloads]
        if need.tests:
            counted.append(caches.add_launches(_test_launches(need.tests), tuned=False))
        if need.kernel_bench:
            counted.append(caches.add_launches(_kernel_bench_launches(), tuned=True))
        for n, c, t in counted:
            launches, compiles, trials = launches + n, compiles + c, trials + t
        chains = [
            sum(cost("inductor-cached" if g == "cached" else f"inductor-{g}") for g in chain)
            + (0 if need.processes else len(chain) * cost("process"))
            for chain in need.inductor
        ]
        serial = need.processes * cost("process") + compiles * cost("compile") + trials * cost("trial")
        seconds = serial + max(chains, default=0.0) + need.steps * cost("step") + need.counts * cost("count")
        rows.append({
            "stage": stage.name, "limit": stage.limit, "background": stage.background,
            "processes": need.processes or sum(map(len, need.inductor)), "launches": launches, "compiles": compiles,
            "trials": trials, "inductor": [g for chain in need.inductor for g in chain],
            "need": seconds, "start": start, "note": need.note,
        })  # fmt: skip
        if not stage.background:
            start += stage.limit + gpu_check.KILL_AFTER_S
    return rows


def _test_launches(paths: list[str]) -> list:
    """Every launch the test files make, run in the interpreter as the GPU check runs them (one
    configuration per kernel, ``FASTDENSE_AUTOTUNE=0``)."""
    import pytest

    from fastdense.kernels.launch import recording

    os.environ["FASTDENSE_AUTOTUNE"] = "0"
    try:
        with recording(run=True) as launches:
            pytest.main(["-q", "-p", "no:cacheprovider", "-x", *paths])
    finally:
        del os.environ["FASTDENSE_AUTOTUNE"]
    return launches


def _kernel_bench_launches() -> list:
    """The kernel microbenchmark's fused launches at its GPU sizes, recorded on fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastdense.kernels.launch import recording
    from fastdense.tools import kernel_bench

    with FakeTensorMode(allow_non_fake_inputs=True), recording() as launches:
        for _, side, c_in in kernel_bench.DENSENET121_LAYERS:
            for case in (kernel_bench.gemm_case(64, side, c_in, torch.bfloat16, torch.device("cpu")),
                         kernel_bench.conv_case(64, side, torch.bfloat16, torch.device("cpu"))):  # fmt: skip
                next(iter(case["candidates"].values()))()  # the fused candidate comes first
    return launches


def expected_timeline(rows: list[dict]) -> None:
    """Each stage's expected start and end with its estimated need (a stage that waits for a background
    one starts when both are ready), in place."""
    clock, ends = 0.0, {}
    for row, stage in zip(rows, gpu_check.stages(), strict=True):
        start = max(clock, ends.get(stage.waits_for, 0.0)) if stage.waits_for else clock
        row["expected_start"], row["expected_end"] = start, start + row["need"]
        ends[stage.name] = row["expected_end"]
        if not stage.background:
            clock = row["expected_end"]


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the small-shape tests run here: set before triton's import
    rows = plan()
    expected_timeline(rows)
    print(f"GPU check time plan: budget {gpu_check.BUDGET_S} s. 'latest' assumes every earlier stage takes its "
          f"whole limit (+{gpu_check.KILL_AFTER_S} s); 'expected' runs each stage for its estimated need")  # fmt: skip
    print(f"{'stage':18} {'latest':>6} {'expected':>11} {'limit':>5} {'need':>5}  {'procs':>5} {'launches':>8} "
          f"{'compiles':>8} {'trials':>6}  inductor graphs / note")  # fmt: skip
    for r in rows:
        latest = "bg" if r["background"] else f"{r['start']:.0f}"
        expected = f"{r['expected_start']:.0f}-{r['expected_end']:.0f}"
        graphs = ", ".join(r["inductor"]) if r["inductor"] else ""
        print(f"{r['stage']:18} {latest:>6} {expected:>11} {r['limit']:5d} {r['need']:5.0f}  {r['processes']:5d} "
              f"{r['launches']:8d} {r['compiles']:8d} {r['trials']:6d}  "
              f"{'; '.join(x for x in (graphs, r['note']) if x)}")  # fmt: skip
    print("\nunit costs (estimates, none measured on a GPU):")
    for unit, (seconds, source) in UNITS.items():
        print(f"  {unit:16} {seconds:7.2f} s  {source}")


if __name__ == "__main__":
    main()
