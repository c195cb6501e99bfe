"""``python -m fastdense bench``: speed and peak memory of fastdense against torchvision and torch.compile.

Every measurement runs in a fresh process (``fastdense.tools.measure``): per batch size and mode, one process
times all providers with interleaved rounds (on CUDA it also measures their peak memory), then on the
CPU one process per provider measures its peak memory; with ``--max-batch`` on CUDA one process per
provider finds the largest batch it trains. The table shows ratios against
torchvision eager; ``--json`` keeps every figure, ``--plot`` draws throughput, peak memory and, for
inference, the fraction of the roofline floor (``fastdense.tools.roofline``) against batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
import torchvision

import fastdense

from . import tables
from .measure import DTYPES, MODES, describe, run_worker
from .providers import BASELINE, MODELS, PROVIDERS, providers_for
from .roofline import Peaks, inference_work
from .timing import default_device, device_defaults
from .volumes import MODELS as VOLUME_MODELS
from .volumes import PROVIDERS as VOLUME_PROVIDERS


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        done = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": _version_of("triton"),
        "fastdense": fastdense.__version__,
        "commit": _commit(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _version_of(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@dataclass
class Plan:
    model: str
    batches: list[int]
    modes: list[str]
    providers: list[str]
    resolution: int
    dtype: str
    device: str
    channels_last: bool
    repeats: int
    max_batch: bool = False
    roofline: bool = True  # measure the device's peaks (one process) for the inference rows' roofline fraction
    start_json: str | None = None  # max-batch: start each provider's search at its counted largest batch


def _measure(metric: str, providers: list[str], plan: Plan, mode: str, batch: int) -> list[dict]:
    command = [sys.executable, "-m", "fastdense.tools.measure", "--metric", metric]
    if providers:
        command += ["--provider", *providers]
    command += ["--mode", mode, "--model", plan.model, "--batch", str(batch), "--resolution", str(plan.resolution)]
    command += ["--dtype", plan.dtype, "--device", plan.device, "--repeats", str(plan.repeats)]
    if plan.channels_last:
        command.append("--channels-last")
    if metric == "max-batch" and plan.start_json:
        command += ["--growth", "1.125"]  # from a counted estimate: small steps
    what = f"measuring {metric} of {', '.join(providers)} ({mode}, batch {batch})"
    return run_worker(command, memory=metric == "memory", what=what)


def jobs(plan: Plan) -> list[tuple[str, list[str], str, int]]:
    """(metric, providers, mode, batch) for every measurement process, in the order they run. With
    ``max_batch`` only the largest-batch searches run, one process per provider, from the first batch."""
    if plan.max_batch:
        starts = counted_largest_batches(plan.start_json) if plan.start_json else {}
        return [("max-batch", [p], "train", starts.get(p, plan.batches[0])) for p in plan.providers]
    todo = [("peaks", [], "infer", plan.batches[0])] if plan.roofline else []
    cuda = plan.device.startswith("cuda")  # there the timing process measures peak memory too
    for batch in plan.batches:
        for mode in plan.modes:
            todo.append(("time", plan.providers, mode, batch))
            todo += [] if cuda else [("memory", [p], mode, batch) for p in plan.providers]
    return todo


def counted_largest_batches(path: str) -> dict[str, int]:
    """Each provider's counted largest batch on the first card of a ``python -m fastdense fit --json`` file
    (a missing or unreadable file: none; the searches then start from ``--batch``)."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    return {row["provider"]: row["cards"][0]["largest"] for row in rows if row["cards"][0]["largest"] > 0}


def _measure_each(metric: str, providers: list[str], plan: Plan, mode: str, batch: int) -> list[dict]:
    """The rows of one measurement process. When the process dies (a crash takes every provider in it
    down, whatever failed), each provider is measured again in a process of its own, so that one
    provider's crash costs only its own rows; a provider that fails alone is a row with its ``error``."""
    try:
        return _measure(metric, providers, plan, mode, batch)
    except RuntimeError as error:
        if len(providers) > 1:
            return [row for p in providers for row in _measure_each(metric, [p], plan, mode, batch)]
        setting = {"model": plan.model, "mode": mode, "batch": batch, "device": plan.device, "dtype": plan.dtype}
        return [{"provider": providers[0] if providers else None, **setting, "error": describe(error)}]


def _add_roofline(row: dict, peaks: Peaks) -> None:
    if row["mode"] == "infer" and "ms_median" in row:
        element = torch.finfo(DTYPES[row["dtype"]]).bits // 8
        work = inference_work(row["model"], row["batch"], row["resolution"], element)
        row["roofline_floor_ms"] = peaks.floor_seconds(work) * 1e3
        fraction = row["roofline_floor_ms"] / row["ms_median"]
        # A step faster than the floor means the measured peaks undershoot this device: then the floor is
        # no bound, and no fraction (above 100%) is reported.
        if fraction <= 1.0:
            row["roofline_fraction"] = fraction


def run(plan: Plan, progress: bool = True, json_path: str | None = None) -> dict:
    """Measure everything in ``plan``; return environment, device peaks and one row per provider, mode
    and batch. With ``json_path`` the result so far is written after every measurement (``complete``
    says whether all of them ran), so a run cut short keeps what it measured."""
    todo = jobs(plan)
    result = {"environment": environment(), "plan": asdict(plan), "peaks": None, "rows": [], "complete": False}
    versions = {key: result["environment"][key] for key in ("torch", "torchvision", "triton", "fastdense", "commit")}
    rows: dict[tuple, dict] = {}
    with tables.progress(len(todo), enabled=progress) as step:
        for metric, providers, mode, batch in todo:
            step(f"{metric} {mode} batch {batch}: {', '.join(providers) or 'device'}")
            measured = _measure_each(metric, providers, plan, mode, batch)
            if metric == "peaks":
                result["peaks"] = None if "error" in measured[0] else measured[0]
            else:
                for row in measured:
                    merged = rows.setdefault((row["provider"], mode, batch), {})
                    merged.update(row | versions)
                    if result["peaks"]:
                        _add_roofline(merged, Peaks(**result["peaks"]))
            result["rows"] = list(rows.values())
            add_speedups(result["rows"])
            if json_path:
                write_json(result, json_path)
    result["complete"] = True
    if json_path:
        write_json(result, json_path)
    return result


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def add_speedups(rows: list[dict]) -> None:
    """Each timed row's speed against torchvision eager's (``BASELINE``) measured in the same process: the
    median and 20th/80th percentiles of the per-round ratios (``speed_vs_eager``, ``..._p20``, ``..._p80``).
    The rounds interleave the providers, so a round's ratio compares steps run side by side, and the
    machine's drift between rounds, which moves both steps alike, cancels out of it."""
    for row in rows:
        base = next(
            (r for r in rows if r["provider"] == BASELINE and r["mode"] == row["mode"] and r["batch"] == row["batch"]),
            None,
        )
        if base is None or not row.get("ms_all") or len(base.get("ms_all", [])) != len(row["ms_all"]):
            continue
        ratios = sorted(b / t for b, t in zip(base["ms_all"], row["ms_all"], strict=True))
        quantiles = statistics.quantiles(ratios, n=5, method="inclusive") if len(ratios) > 1 else ratios * 4
        row |= {
            "speed_vs_eager": statistics.median(ratios),
            "speed_vs_eager_p20": quantiles[0],
            "speed_vs_eager_p80": quantiles[-1],
        }


def _speedup_cell(row: dict, base: dict) -> str:
    """``speed_vs_eager`` with its 20th-80th percentiles, or the ratio of the medians without per-round times."""
    if "speed_vs_eager" not in row:
        return _ratio(base.get("ms_median"), row["ms_median"])
    return f"{row['speed_vs_eager']:.2f}x ({row['speed_vs_eager_p20']:.2f}-{row['speed_vs_eager_p80']:.2f})"


def print_table(result: dict) -> None:
    plan, rows, peaks = result["plan"], result["rows"], result["peaks"]
    layout = "channels_last" if plan["channels_last"] else "contiguous"
    device = next((r["device_name"] for r in rows if "device_name" in r), plan["device"])
    measured_peaks = "device peaks not measured"
    if peaks:
        matmul, copy = peaks["matmul_flops"] / 1e12, peaks["copy_bytes_per_s"] / 1e9
        measured_peaks = f"measured peaks: matmul {matmul:.2f} TFLOP/s, copy {copy:.0f} GB/s"
    print(f"\n{plan['model']}, {plan['resolution']}x{plan['resolution']}, {plan['dtype']}, {layout}, device {device}")
    if plan["max_batch"]:
        cells = [
            [r["provider"], str(r.get("max_batch", "-")), str(r.get("max_batch_fails") or "-"), r.get("error", "")]
            for r in rows
        ]
        tables.print_table("largest training batch", ["provider", "fits", "fails", "error"], cells, text_columns=1)
        return
    print(f"median of {plan['repeats']} interleaved rounds after warm-up; {measured_peaks}")
    headers = ["provider", "backend", "ms (p20-p80)", "images/s", "speed vs eager", "peak MiB", "memory vs eager"]
    headers += ["first step s", "max_rel_err", "roofline"]
    for mode in plan["modes"]:
        for batch in plan["batches"]:
            group = [r for r in rows if r["mode"] == mode and r["batch"] == batch and "ms_median" in r]
            base = next((r for r in group if r["provider"] == BASELINE), {})
            cells = []
            for r in group:
                err = r.get("max_rel_err")
                peak = r.get("peak_mem_mb")
                cells.append(
                    [
                        r["provider"],
                        r["backend"],
                        f"{r['ms_median']:.1f} ({r['ms_p20']:.1f}-{r['ms_p80']:.1f})",
                        f"{r['images_per_s']:.1f}",
                        _speedup_cell(r, base),
                        "-" if peak is None else f"{peak:.1f}",
                        _ratio(peak, base.get("peak_mem_mb")),
                        f"{r['first_step_s']:.2f}",
                        "-" if err is None else f"{err:.1e}",
                        f"{100 * r['roofline_fraction']:.1f}%" if "roofline_fraction" in r else "-",
                    ]
                )
            tables.print_table(f"{mode}, batch {batch}", headers, cells, text_columns=2)
            for r in rows:
                if r["mode"] == mode and r["batch"] == batch and "error" in r:
                    print(f"  {r['provider']}: FAILED: {r['error']}")
    print(
        "speed vs eager: torchvision eager's time over this one in the same round, median (p20-p80) over the "
        "rounds;\nhigher is faster. memory vs eager: this peak over eager's. peak MiB: extra peak memory of one "
        "step.\nmax_rel_err: max |out - ref| / max |ref| of the logits against torchvision in float64 on the same "
        "weights and input.\nroofline: floor time over "
        "measured time (inference; see fastdense.tools.roofline)."
    )


def add_arguments(parser: argparse.ArgumentParser, *, default_providers_note: str) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--model", default="densenet121", choices=sorted(MODELS) + sorted(VOLUME_MODELS),
        help="a MONAI 3-D model runs the volumes benchmark (python -m fastdense volumes): --resolution is "
        "the volume edge, --providers among " + " ".join(VOLUME_PROVIDERS),
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=int, nargs="+", action="extend", help="batch sizes (repeatable; default: CUDA 64 256, CPU 8)"
    )
    parser.add_argument("--resolution", type=int, default=None, help="default: 224 (64 with --quick on the CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    every_provider = sorted(set(PROVIDERS) | set(VOLUME_PROVIDERS))
    parser.add_argument("--providers", nargs="+", choices=every_provider, default=None, help=default_providers_note)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: CUDA 20, CPU 10; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds: a smoke run")
    parser.add_argument("--json", help="write every figure to this JSON file")


def volume_benchmark(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict]:
    """``--model monai-densenet...-3d``: the volumes benchmark with these options (``fastdense.tools.volumes``):
    its table, and its JSON and plot where asked for."""
    from . import volumes

    unknown = sorted(set(args.providers or ()) - set(VOLUME_PROVIDERS))
    if unknown:
        parser.error(f"--providers for {args.model}: {' '.join(VOLUME_PROVIDERS)} (not {' '.join(unknown)})")
    if args.batch and len(args.batch) > 1:
        parser.error(f"--batch for {args.model}: one batch size")
    options = volumes.Options(
        model=args.model,
        volumes=[args.resolution] if args.resolution else None,
        batch=args.batch[0] if args.batch else 2,
        device=default_device(args.device),
        providers=args.providers,
        repeats=args.repeats or 3,
        json=args.json,
        plot=getattr(args, "plot", None),
    )
    return volumes.run_and_print(options)


def plan_from_args(args: argparse.Namespace, default_providers: list[str] | None = None) -> Plan:
    device = default_device(args.device)
    cuda, defaults = device.startswith("cuda"), device_defaults(device)
    default_batches = ([64] if args.quick else [64, 256]) if cuda else ([2] if args.quick else [8])
    batches = args.batch or default_batches
    providers = args.providers or default_providers or providers_for(torch.device(device))
    if BASELINE not in providers:
        providers = [BASELINE, *providers]  # every ratio is against it
    return Plan(
        model=args.model,
        batches=batches,
        modes=list(MODES) if args.mode == "both" else [args.mode],
        providers=providers,
        resolution=args.resolution or (64 if args.quick and not cuda else 224),
        dtype=args.dtype or defaults["dtype"],
        device=device,
        channels_last=defaults["channels_last"] if args.channels_last is None else args.channels_last,
        repeats=args.repeats or (3 if args.quick else 20 if cuda else 10),
        max_batch=getattr(args, "max_batch", False),
        roofline=not getattr(args, "no_roofline", False),
        start_json=getattr(args, "start_json", None),
    )


def main(argv: list[str] | None = None) -> None:
    from . import describe

    parser = argparse.ArgumentParser(prog="python -m fastdense bench", description=describe(__doc__))
    add_arguments(parser, default_providers_note="default: every provider the device supports")
    parser.add_argument("--plot", help="write PNG plots to this path (…/name.png)")
    parser.add_argument(
        "--no-roofline", action="store_true", help="skip measuring the device's peaks (and the roofline column)"
    )
    parser.add_argument(
        "--start-json", help="--max-batch: start each provider at its counted largest batch (a fit --json file)"
    )
    parser.add_argument(
        "--max-batch", action="store_true",
        help="CUDA: instead of timing, the largest batch each provider trains (searched from the first --batch)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.model in VOLUME_MODELS:
        volume_benchmark(parser, args)
        return
    plan = plan_from_args(args)
    if plan.max_batch and not plan.device.startswith("cuda"):
        parser.error("--max-batch needs --device cuda")
    result = run(plan, json_path=args.json)
    print_table(result)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import plot

        plot(result, args.plot)
        print(f"wrote {args.plot}")
