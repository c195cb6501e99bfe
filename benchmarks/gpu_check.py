"""The GPU machine's one prepared run: stages in order of value, each under a time limit, results always back.

``benchmarks/gpu_check.sh [--rehearse] [--budget SECONDS] OUTDIR`` runs this (see the README's "The GPU
check"). A GPU is lent for 15 minutes in all, at most 600 s a command, and only what a command leaves in
OUTDIR comes back (at most 8 files, two folders deep). So:

* every stage runs under ``timeout -k`` with its limit, cut to what is left of the budget (``--budget``,
  480 s by default); a stage that would get less than ``MIN_STAGE_S`` is skipped;
* each stage logs to ``<scratch>/results/NAME.log`` (its JSON beside it); caches (Triton's kernels and
  tuning results, Inductor's) and scratch live in ``/tmp``, never in OUTDIR;
* after every stage, and every ``PUBLISH_EVERY_S`` while one runs, OUTDIR gets ``summary.txt`` (the
  short tables) and ``results.tar.gz`` (every log and JSON), each replaced atomically: a run killed at
  any moment leaves what it had measured;
* a failing stage, or a failing provider inside a benchmark stage (a row with its error), does not stop
  the run; the summary is printed last.

``--rehearse`` runs the same plumbing on the CPU with stand-ins at tiny sizes, plus two stages that show
a failure and a cut (tests/test_gpu_check.py checks what it leaves). ``--plan`` prints the time plan:
each stage's limit beside its counted Triton compiles and tuning trials (``benchmarks/gpu_plan.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BUDGET_S = 480  # the one call's share of the 15 device minutes (the machine's start takes 1-3 of them)
MIN_STAGE_S = 20  # a stage that would get less is skipped
KILL_AFTER_S = 5  # timeout -k: a stage that ignores SIGTERM is killed this long after it
# The CPU rehearsal's stages take about 145 s on an idle 2-core machine and up to twice that beside a busy
# test worker (CI's); its budget leaves the later stages room there, under the tests' 400 s timeout.
REHEARSAL_BUDGET_S = 300
PUBLISH_EVERY_S = 30
PYTHON = sys.executable

TUNED, FIXED, NO_KERNELS = "autotuned", "fixed (FASTDENSE_AUTOTUNE=0)", "-"


@dataclass
class Stage:
    name: str
    limit: int  # seconds
    command: list[str]  # on the GPU
    tuning: str = NO_KERNELS  # how its Triton kernels pick their configurations
    rehearsal: list[str] | None = None  # the CPU stand-in (None: not rehearsed, a line says so)
    env: dict[str, str] = field(default_factory=dict)
    why: str = ""
    rehearsal_env: dict[str, str] = field(default_factory=dict)
    background: bool = False  # started, not waited for: the stages after it run meanwhile
    requires: str | None = None  # a package the stage needs: without it the stage is skipped, in one line
    waits_for: str | None = None  # a background stage that must end first (waiting counts toward the limit)


def _bench(name: str, *args: str, gpu: bool = True) -> list[str]:
    """A ``python -m fastdense bench`` command writing ``NAME.json`` (and its plot on the GPU)."""
    command = [PYTHON, "-m", "fastdense", "bench", *args, "--json", f"{{results}}/{name}.json"]
    return command + ([f"--plot={{results}}/{name}.png"] if gpu else [])


def _warm(setting: tuple[str, ...], chains: list[list[tuple[str, str]]], provider: str) -> list[str]:
    """One command that builds and runs a first step of ``provider`` for each (mode, batch), the chains in
    parallel: it fills the shared compile caches (``python -m fastdense.tools.measure --metric warm``)."""

    def step(mode: str, batch: str) -> str:
        measure = [PYTHON, "-m", "fastdense.tools.measure", "--metric", "warm", "--provider", provider]
        return shlex.join([*measure, *setting, "--mode", mode, "--batch", batch])

    parts = [" && ".join(step(*job) for job in chain) for chain in chains]
    started = " ".join(f"( {part} ) & p{i}=$!;" for i, part in enumerate(parts))
    waited = " ".join(f"wait $p{i} || rc=1;" for i in range(len(parts)))
    return ["bash", "-c", f"rc=0; {started} {waited} exit $rc"]


GPU_BENCH = ("--device", "cuda", "--model", "densenet121", "--dtype", "bfloat16", "--channels-last")
CPU_BENCH = ("--device", "cpu", "--model", "densenet-tiny", "--resolution", "32", "--dtype", "float32")
EAGER = ("torchvision-eager", "torchvision-memory-efficient", "fastdense", "fastdense-memory-efficient")
TRITON = ("fastdense-triton", "fastdense-triton-memory-efficient")
GRAPHS = ("torchvision-cuda-graph", "fastdense-cuda-graph", "fastdense-triton-cuda-graph")
PYTEST = (PYTHON, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider")
FIXED_ENV = {"FASTDENSE_AUTOTUNE": "0"}


def stages() -> list[Stage]:
    """The stages, most valuable first: the headline comparison ends within 300 s even if every stage
    before it takes its whole limit; what follows may be cut (the time plan: ``benchmarks/gpu_plan.py``)."""
    warm_chains = [[("train", "256")], [("train", "64")], [("infer", "256"), ("infer", "64")]]
    return [
        Stage(
            "environment", 10, [PYTHON, "benchmarks/gpu_check.py", "--environment"],
            rehearsal=[PYTHON, "benchmarks/gpu_check.py", "--environment"],
            why="versions, the card, whether monai is importable",
        ),
        Stage(
            "warm-compile", 200, _warm(GPU_BENCH, warm_chains, "torch-compile"),
            env={"TORCHINDUCTOR_COMPILE_THREADS": "4"}, background=True,
            rehearsal=_warm(("--device", "cpu", "--model", "densenet-tiny", "--resolution", "32"),
                            [[("infer", "2")]], "fastdense"),
            why="Inductor compiles torchvision's four graphs (train/infer, batch 256/64) into its cache, three "
            "processes of 4 compile workers, while the GPU runs the stages below (their GPU use: four first steps)",
        ),
        Stage(
            "fit", 150,
            [PYTHON, "-m", "fastdense", "fit", "--memory", "device", "--providers", "torchvision-eager",
             "torchvision-memory-efficient", "fastdense-triton", "fastdense-triton-memory-efficient",
             "--json", "{results}/fit.json"],
            background=True,
            rehearsal=[PYTHON, "-m", "fastdense", "fit", "--model", "densenet-tiny", "--resolution", "32", "--memory",
                       "1GiB", "--device", "cpu", "--providers", "torchvision-eager", "fastdense",
                       "--json", "{results}/fit.json"],
            why="the largest training batch of each provider, counted on the CPU (fake tensors) while the GPU "
            "runs the stages below; the max-batch stage starts its searches there",
        ),
        Stage(
            "traffic", 90,
            [PYTHON, "-m", "fastdense", "traffic", "--batch", "64", "256", "--providers", *EAGER, *TRITON,
             "--json", "{results}/traffic.json"],
            background=True,
            rehearsal=[PYTHON, "-m", "fastdense", "traffic", "--model", "densenet-tiny", "--resolution", "32",
                       "--batch", "2", "--dtype", "float32", "--providers", "torchvision-eager", "fastdense",
                       "fastdense-triton", "--json", "{results}/traffic.json"],
            why="each provider's step counted on the CPU (fake tensors: launches, bytes, FLOPs) and its roofline "
            "floor, which the summary prints beside the measured time",
        ),
        Stage(
            "host", 150,
            [PYTHON, "-m", "fastdense", "host", "--json", "{results}/host.json"],
            background=True,
            rehearsal=[PYTHON, "-m", "fastdense", "host", "--model", "densenet-tiny", "--mode", "train", "--repeats",
                       "2", "--providers", "torchvision-eager", "fastdense-triton", "--json", "{results}/host.json"],
            why="each provider's host time per step on this machine's CPU, without the GPU (a stub CUDA driver), "
            "beside the enqueue time the benchmark stages measure on the GPU",
        ),
        Stage(
            "correctness", 60, [*PYTEST, "tests/test_gpu_correctness.py"], FIXED, env=FIXED_ENV,
            rehearsal=[*PYTEST, "tests/test_gpu_correctness.py", "-k", "torch and train"],
            why="both backends, densenet121 batch 32 at 224, bf16 and fp32, train and eval, against torchvision",
        ),
        Stage(
            "headline-train", 70,
            _bench("headline-train", *GPU_BENCH, "--mode", "train", "--batch", "64", "256", "--repeats", "10",
                   "--providers", *EAGER, *TRITON),
            TUNED,
            rehearsal=_bench("headline-train", *CPU_BENCH, "--mode", "train", "--batch", "2", "--repeats", "2",
                             "--providers", "torchvision-eager", "fastdense", "fastdense-triton", gpu=False),
            why="a training step at batch 64 and 256: torchvision eager and memory_efficient, both backends",
        ),
        Stage(
            "headline-infer", 40,
            _bench("headline-infer", *GPU_BENCH, "--mode", "infer", "--batch", "64", "256", "--repeats", "10",
                   "--providers", *EAGER, *TRITON),
            TUNED,
            rehearsal=_bench("headline-infer", *CPU_BENCH, "--mode", "infer", "--batch", "2", "--repeats", "2",
                             "--providers", "torchvision-eager", "fastdense", gpu=False),
            why="inference at batch 64 and 256, the same providers",
        ),
        Stage(
            "headline-compile", 75,
            _bench("headline-compile", *GPU_BENCH, "--mode", "both", "--batch", "64", "256", "--repeats", "10",
                   "--no-roofline", "--providers", "torchvision-eager", "torch-compile"),
            waits_for="warm-compile",
            rehearsal=_bench("headline-compile", *CPU_BENCH, "--mode", "infer", "--batch", "2", "--repeats", "2",
                             "--providers", "torchvision-eager", "fastdense-memory-efficient", gpu=False),
            why="torch.compile of torchvision at batch 64 and 256, from the warmed cache",
        ),
        Stage(
            "headline-graphs", 50,
            _bench("headline-graphs", *GPU_BENCH, "--mode", "both", "--batch", "64", "256", "--repeats", "10",
                   "--no-roofline", "--providers", "torchvision-eager", *GRAPHS),
            TUNED,
            rehearsal=_bench("headline-graphs", *CPU_BENCH, "--mode", "train", "--batch", "2", "--repeats", "2",
                             "--providers", "torchvision-eager", "fastdense", gpu=False),
            why="whole steps captured in CUDA graphs (torchvision, both backends), batch 64 and 256, train and infer",
        ),
        Stage(
            "kernels", 20, [PYTHON, "-m", "fastdense", "kernels", "--json", "{results}/kernels.json"], TUNED,
            rehearsal=[PYTHON, "-m", "fastdense", "kernels", "--repeats", "1", "--json", "{results}/kernels.json"],
            rehearsal_env={"TRITON_INTERPRET": "1"},  # the kernels' toy sizes in the interpreter
            why="BN-ReLU-GEMM and the 3x3 implicit GEMM against cat+BN+ReLU+cuDNN (GB/s, TFLOP/s)",
        ),
        Stage(
            "max-batch", 60,
            _bench("max-batch", *GPU_BENCH, "--max-batch", "--batch", "512", "--start-json", "{results}/fit.json",
                   "--providers", "torchvision-eager", "torchvision-memory-efficient", "fastdense-triton",
                   "fastdense-triton-memory-efficient"),
            FIXED, env=FIXED_ENV, waits_for="fit",
            why="the largest training batch each fits in the card, measured from the counted one (no tuning: its "
            "copies would inflate the peak)",
        ),
        Stage(
            "gpu-tests", 45, [*PYTEST, "tests/test_cuda.py"], FIXED, env=FIXED_ENV,
            why="the four ImageNet variants on the triton backend, SGD steps, a buffer past 2^31 elements",
        ),
        Stage(
            "graphs", 30, [*PYTEST, "tests/test_cuda_graphs.py"], FIXED, env=FIXED_ENV,
            why="CUDA graph capture, torch.compile mode='reduce-overhead'",
        ),
        Stage(
            "volumes-128", 40,
            [PYTHON, "-m", "fastdense", "volumes", "--device", "cuda", "--volumes", "128", "--batch", "2",
             "--repeats", "3", "--providers", "monai-eager", "fastdense", "fastdense-memory-efficient",
             "--json", "{results}/volumes-128.json"],
            requires="monai",
            why="MONAI's DenseNet121 on 128^3 volumes against its conversion (needs monai)",
        ),
        Stage(
            "small-shapes", 70, [*PYTEST, "tests/test_kernels.py", "tests/test_kernel_configs.py"], FIXED,
            env=FIXED_ENV, why="the kernels on the interpreter's small odd shapes, compiled; every configuration",
        ),
        Stage(
            "bench-densenet201", 60,
            _bench("bench-densenet201", "--device", "cuda", "--model", "densenet201", "--dtype", "bfloat16",
                   "--channels-last", "--mode", "both", "--batch", "64", "--repeats", "10",
                   "--providers", "torchvision-eager", "fastdense", "fastdense-triton"),
            TUNED, why="a deeper network",
        ),
        Stage(
            "compile-triton", 45,
            _bench("compile-triton", *GPU_BENCH, "--mode", "infer", "--batch", "256", "--repeats", "10",
                   "--no-roofline", "--providers", "torchvision-eager", "fastdense-triton-compile"),
            TUNED, why="torch.compile around fastdense's triton blocks, inference",
        ),
    ]  # fmt: skip


def rehearsal_stages() -> list[Stage]:
    """The stages with their CPU stand-ins, then the two that show a failure and a cut."""
    not_rehearsed = [PYTHON, "-c", "print('needs a GPU: not rehearsed')"]
    rehearsed = [
        Stage(s.name, 90, s.rehearsal or not_rehearsed, s.tuning, env=s.rehearsal_env, background=s.background,
              waits_for=s.waits_for)
        for s in stages()
    ]  # fmt: skip
    fails = [PYTHON, "-c", "import sys; print('a stage that fails'); sys.exit(3)"]
    # Ignores SIGTERM: only timeout's -k (SIGKILL) ends it, at its limit plus KILL_AFTER_S.
    ignores_term = [PYTHON, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
    return [
        *rehearsed[:4],
        Stage("rehearse-fails", 20, fails, why="a stage that fails: the run goes on"),
        Stage("rehearse-cut", 8, ignores_term, why="a stage past its limit that ignores SIGTERM: killed"),
        *rehearsed[4:],
    ]


def environment() -> None:
    """The ``environment`` stage: what ran, on what."""
    import datetime
    import importlib.util
    import platform

    import torch
    import torchvision

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu}")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    for package in ("triton", "timm", "monai"):
        if importlib.util.find_spec(package) is None:
            versions[package] = "not installed"
        else:
            versions[package] = getattr(__import__(package), "__version__", "?")
    print(", ".join(f"{name} {version}" for name, version in versions.items()))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        memory, cudnn = props.total_memory / 2**30, torch.backends.cudnn.version()
        print(f"{props.name}: {memory:.0f} GiB, {props.multi_processor_count} SMs, capability {props.major}."
              f"{props.minor}, CUDA {torch.version.cuda}, cuDNN {cudnn}")  # fmt: skip
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv"])


class Run:
    """One run of the check: the stages, the scratch folder, and what OUTDIR gets."""

    def __init__(self, out: Path, budget: int, rehearse: bool) -> None:
        self.out, self.budget, self.rehearse = out, budget, rehearse
        self.scratch = Path(tempfile.mkdtemp(prefix="fastdense-gpu-check-", dir="/tmp"))
        self.results = self.scratch / "results"
        self.results.mkdir()
        self.start = time.monotonic()
        self.rows: list[dict] = []  # one per stage: name, limit, seconds, status, rc, tuning
        self.env = dict(os.environ) | {
            "TRITON_CACHE_DIR": str(self.scratch / "triton-cache"),  # kernels and tuning results, shared
            "TRITON_CACHE_AUTOTUNING": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(self.scratch / "inductor-cache"),
            "MPLCONFIGDIR": str(self.scratch / "matplotlib"),
            "PYTHONUNBUFFERED": "1",
        }
        self._lock = threading.Lock()
        self.background: dict[str, _Running] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run_stage(self, stage: Stage) -> None:
        """Run ``stage`` under its limit (cut to the budget left), or start it when it runs in the background."""
        self._reap()
        row = {"stage": stage.name, "limit": stage.limit, "tuning": stage.tuning, "seconds": 0.0, "rc": None}
        self.rows.append(row)
        waited = self._wait_for(stage.waits_for, stage.limit // 2) if stage.waits_for else 0.0
        left = int(self.budget - self.elapsed()) - KILL_AFTER_S
        if left < MIN_STAGE_S:
            row |= {"status": "SKIPPED", "note": f"the {self.budget} s budget is spent"}
            return
        if stage.requires and importlib.util.find_spec(stage.requires) is None:
            note = f"{stage.requires} is not installed (benchmarks/fetch_gpu_extras.sh brings its wheel)"
            print(f"== {stage.name}: SKIPPED, {note}", flush=True)
            row |= {"status": "SKIPPED", "note": note, "absent": stage.requires}
            return
        limit = min(stage.limit - int(waited), left)
        command = [arg.format(results=self.results) for arg in stage.command]
        where = "in the background, " if stage.background else ""
        print(f"== {stage.name} ({where}limit {limit} s, {stage.tuning}): {shlex.join(command)}", flush=True)
        timed = ["timeout", "-k", str(KILL_AFTER_S), str(limit), *command]
        with open(self.results / f"{stage.name}.log", "w") as log:  # the process keeps its own copy open
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(timed, stdout=log, stderr=subprocess.STDOUT, env=self.env | stage.env)
        running = _Running(process, time.monotonic(), limit, row | {"limit": limit, "status": "RUNNING"})
        self.rows[-1] = running.row
        if waited >= 1:
            running.row["note"] = f"waited {waited:.0f} s for {stage.waits_for}"
        if stage.background:
            self.background[stage.name] = running
        else:
            running.finish(process.wait())

    def _wait_for(self, name: str, at_most: float) -> float:
        """Wait for background stage ``name`` to end, at most ``at_most`` seconds (then it is cut); the wait."""
        running = self.background.get(name)
        if running is None or running.done:
            return 0.0
        began = time.monotonic()
        try:
            rc = running.process.wait(timeout=max(at_most, 0))
        except subprocess.TimeoutExpired:
            try:  # timeout runs in a process group of its own, with its command: end both
                os.killpg(running.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                running.process.kill()
            running.process.wait()
            running.finish(124, note=f"cut after {time.monotonic() - running.began:.0f} s: no more time to wait")
            return time.monotonic() - began
        running.finish(rc)
        return time.monotonic() - began

    def _reap(self) -> None:
        """Complete the rows of background stages that have ended (their time is their own)."""
        for running in self.background.values():
            if not running.done and running.process.poll() is not None:
                running.finish(running.process.returncode)

    def finish_background(self) -> None:
        """At the end: let background stages finish within the budget, then cut them."""
        for name in list(self.background):
            self._wait_for(name, self.budget - self.elapsed())

    def publish(self) -> str:
        """Write ``summary.txt`` and ``results.tar.gz`` into OUTDIR (each replaced atomically)."""
        from benchmarks.gpu_summary import summary

        with self._lock:
            self._reap()
            for running in self.background.values():
                if not running.done:
                    running.row["seconds"] = time.monotonic() - running.began
            try:
                text = summary(self.results, self.rows, self.budget, self.elapsed(), self.rehearse)
            except Exception as error:  # never lose the run to its summary: the stage rows at least
                text = "\n".join([f"summary failed: {type(error).__name__}: {error}", *map(str, self.rows)]) + "\n"
            (self.results / "summary.txt").write_text(text)
            _replace(self.out / "summary.txt", lambda path: path.write_text(text))
            _replace(self.out / "results.tar.gz", lambda path: _archive(self.results, path))
            return text

    def __call__(self, plan: list[Stage]) -> int:
        stop = threading.Event()

        def keep_publishing():
            while not stop.wait(PUBLISH_EVERY_S):
                self.publish()

        publisher = threading.Thread(target=keep_publishing, daemon=True)
        publisher.start()
        try:
            for stage in plan:
                self.run_stage(stage)
                self.publish()
            self.finish_background()
        finally:
            stop.set()
            publisher.join()
            text = self.publish()
        print("\n" + text, end="")
        # A stage skipped for an absent optional package is not a failure of the check; one cut or failed is.
        return 0 if all(row["status"] == "ok" or row.get("absent") for row in self.rows) else 1


class _Running:
    """A stage's process under ``timeout``, and its summary row, which ``finish`` completes."""

    def __init__(self, process, began: float, limit: int, row: dict) -> None:
        self.process, self.began, self.limit, self.row = process, began, limit, row
        self.done = False
        self._once = threading.Lock()  # the publishing thread reaps background stages too

    def finish(self, rc: int, note: str = "") -> None:
        with self._once:
            if not self.done:
                self._finish(rc, note)

    def _finish(self, rc: int, note: str) -> None:
        seconds = time.monotonic() - self.began
        # timeout exits 124 after SIGTERM; after -k's SIGKILL it dies with its child (-9 here, 137 in a shell).
        cut = rc in (124, 137) or (rc == -9 and seconds >= self.limit - 1)
        status = "ok" if rc == 0 else "CUT" if cut else "FAILED"
        note = self.row.get("note", "")
        if status == "CUT":
            note = note or f"cut at its {self.limit} s limit" + (", killed: it ignored SIGTERM" if rc != 124 else "")
        self.row |= {"seconds": seconds, "rc": rc, "status": status, "note": note}
        self.done = True
        print(f"   {self.row['stage']}: {status} (rc {rc}) after {seconds:.0f} s", flush=True)


def _replace(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)


def _archive(results: Path, path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(results, arcname="results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", help="where summary.txt and results.tar.gz go")
    parser.add_argument("--rehearse", action="store_true", help="the same plumbing on the CPU, tiny stand-ins")
    parser.add_argument("--budget", type=int, default=None, help=f"seconds for all stages (default {BUDGET_S}; "
                        f"rehearsal {REHEARSAL_BUDGET_S})")  # fmt: skip
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.environment:
        environment()
        return 0
    if not args.outdir:
        parser.error("OUTDIR is required")
    out = Path(args.outdir)
    if not out.is_dir():
        parser.error(f"OUTDIR {out} is not a folder")
    budget = args.budget or (REHEARSAL_BUDGET_S if args.rehearse else BUDGET_S)
    run = Run(out.resolve(), budget, args.rehearse)
    print(f"gpu_check: budget {budget} s, scratch and caches in {run.scratch}, results in {out.resolve()}")
    return run(rehearsal_stages() if args.rehearse else stages())


if __name__ == "__main__":
    sys.exit(main())
