"""The GPU check's ``summary.txt``: the stages, then each stage's short table, from what its logs and JSON hold.

Written after every stage (and while one runs), so it says what was measured so far: a stage that has not
finished shows what its JSON holds already. Rows with an ``error`` (a provider that failed) are listed with
it; pytest stages show their result line and the tests that failed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BASELINE = "torchvision-eager"


def summary(results: Path, rows: list[dict], budget: int, elapsed: float, rehearse: bool) -> str:
    lines = ["fastdense GPU check" + (" REHEARSAL on the CPU (stand-ins, tiny sizes)" if rehearse else "")]
    environment = results / "environment.log"
    if environment.exists():
        lines += [line for line in environment.read_text().splitlines()[1:4] if line.strip()]
    lines.append(f"budget {budget} s, {elapsed:.0f} s elapsed")
    lines.append(f"{'stage':22} {'limit':>5} {'used':>5}  {'status':8} {'tuning':28} note")
    for row in rows:
        lines.append(
            f"{row['stage']:22} {row['limit']:5d} {row['seconds']:5.0f}  {row['status']:8} {row['tuning']:28} "
            f"{row.get('note', '')}".rstrip()
        )
    try:
        floors = _floors(results)
    except Exception:  # being written this moment: the benchmark tables go without their floors this time
        floors = {}
    for row in rows:
        name = row["stage"]
        try:
            json_file = results / f"{name}.json"
            detail = _pytest(results / f"{name}.log") + _kernels(results, name) + _fit(results, name)
            detail += _host(results, name)
            detail += _volumes(json_file) if name.startswith("volumes") else _bench(json_file, floors)
        except Exception as error:  # a summary must never cost the run: say what could not be read
            detail = [f"(this stage's results could not be summarised: {type(error).__name__}: {error})"]
        if detail:
            lines += ["", f"== {name}", *detail]
    return "\n".join(lines) + "\n"


def _pytest(log: Path) -> list[str]:
    if not log.exists() or "pytest" not in log.read_text().splitlines()[0]:
        return []
    text = log.read_text().splitlines()
    result = [line for line in text if re.search(r"\d+ (passed|failed|error|skipped)|no tests ran", line)]
    failed = [line[:200] for line in text if line.startswith(("FAILED", "ERROR"))]
    return failed + result[-1:]


def _floors(results: Path) -> dict:
    """Each counted step's roofline floor in ms (``python -m fastdense traffic``, the traffic stage) by
    provider, mode and batch, for the card the environment names (an H200 unless it says H100)."""
    path = results / "traffic.json"
    if not path.exists():
        return {}
    environment = results / "environment.log"
    card = "H100 SXM, data sheet" if environment.exists() and "H100" in environment.read_text() else "H200, data sheet"
    floors = {}
    for r in json.loads(path.read_text()):
        if card in r.get("floors", {}):
            floors[r["provider"], r["mode"], r["batch"]] = r["floors"][card] * 1e3
    return floors


def _bench(path: Path, floors: dict | None = None) -> list[str]:
    if not path.exists():
        return []
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:  # being rewritten this moment
        return []
    if not isinstance(result, dict) or "plan" not in result:  # not a benchmark's JSON
        return []
    rows = result.get("rows", [])
    if result["plan"].get("max_batch"):
        return [
            f"{r['provider']:36} largest training batch {r.get('max_batch')} (fails at {r.get('max_batch_fails')})"
            + (f"; ERROR {r['error']}" if "error" in r else "")
            for r in rows
        ]
    floors = floors or {}
    lines = [f"{'mode':5} {'batch':>5} {'provider':34} {'ms':>8} {'host':>6} {'floor':>6} {'img/s':>8} {'speed':>6} "
             f"{'peak MiB':>9} {'memory':>6} {'first s':>7} {'max_rel_err':>11}"]  # fmt: skip
    if not result.get("complete"):
        lines[0] += "   (stage cut: the rows measured so far)"
    for r in rows:
        head = f"{r['mode']:5} {r['batch']:5d} {r['provider']:34}"
        if "error" in r and "ms_median" not in r:
            lines.append(f"{head} FAILED: {r['error']}")
            continue
        if "ms_median" not in r:
            continue
        base = next((b for b in rows if b["provider"] == BASELINE and b["mode"] == r["mode"]
                     and b["batch"] == r["batch"] and "ms_median" in b), None)  # fmt: skip
        speed = r.get("speed_vs_eager") or (base["ms_median"] / r["ms_median"] if base else None)
        peak, base_peak = r.get("peak_mem_mb"), (base or {}).get("peak_mem_mb")
        err = r.get("max_rel_err")
        floor = floors.get((r["provider"], r["mode"], r["batch"]))
        floor = "-" if floor is None else f"{floor:.1f}"
        host = "-" if r.get("host_ms_median") is None else f"{r['host_ms_median']:.1f}"
        lines.append(
            f"{head} {r['ms_median']:8.1f} {host:>6} {floor:>6} {r['images_per_s']:8.1f} {_x(speed):>6} "
            f"{_num(peak):>9} "
            f"{_x(peak / base_peak if peak and base_peak else None):>6} {r['first_step_s']:7.1f} "
            f"{'-' if err is None else f'{err:.1e}':>11}"
        )
    if len(lines) > 1:
        lines.append("(host: the ms a step took to enqueue, before waiting for the GPU; floor: the step's roofline "
                     "floor in ms, counted on fake tensors by the traffic stage, on the card's data sheet: a floor, "
                     "never a time)")  # fmt: skip
    return lines


def _host(results: Path, name: str) -> list[str]:
    """The host stage's table: host time per step on this machine's CPU without the GPU (``fastdense host``)."""
    path = results / "host.json"
    if name != "host" or not path.exists():
        return []
    rows = json.loads(path.read_text())
    return [
        f"{r['mode']:5} {r['provider']:30} host {r['host_ms']:6.1f} ms = {r['measured_ms']:5.1f} measured + "
        f"{r['aten_calls']} PyTorch calls counted; {r['triton_launches']} Triton launches"
        for r in rows
    ] + ["(measured on the CPU with a stub CUDA driver; the benchmark stages' host column is the GPU's enqueue time)"]


def _fit(results: Path, name: str) -> list[str]:
    """The counted figures beside the measured ones: each provider's extra peak at the headline's
    batches (counted line against ``torch.cuda.max_memory_allocated``) and its largest training batch."""
    path = results / "fit.json"
    if name != "fit" or not path.exists():
        return []
    rows = json.loads(path.read_text())["rows"]
    measured = {}
    train = results / "headline-train.json"
    if train.exists():
        for r in json.loads(train.read_text()).get("rows", []):
            if "peak_mem_mb" in r:
                measured[(r["provider"], r["batch"])] = r["peak_mem_mb"]
    largest, searched = {}, results / "max-batch.json"
    if searched.exists():
        largest = {r["provider"]: r.get("max_batch") for r in json.loads(searched.read_text())["rows"]}
    lines = [f"{'provider':34} {'extra peak MiB at 64: counted / measured':>42} {'at 256':>18} {'largest batch':>24}"]
    for row in rows:
        cells = []
        for batch in (64, 256):
            counted = (row["extra_fixed_bytes"] + row["extra_per_unit_bytes"] * batch) / 2**20
            cells.append(f"{counted:8.0f} / {_num(measured.get((row['provider'], batch)))}")
        big = f"{row['cards'][0]['largest']} / {largest.get(row['provider'], '-')}"
        lines.append(f"{row['provider']:34} {cells[0]:>42} {cells[1]:>18} {big:>24}")
    return [*lines, "(counted on fake tensors; measured: torch.cuda.max_memory_allocated, and the max-batch stage)"]


def _kernels(results: Path, name: str) -> list[str]:
    path = results / "kernels.json"
    if name != "kernels" or not path.exists():
        return []
    result = json.loads(path.read_text())
    return [
        f"{r['kernel']:13} {r['shape']:28} {r['candidate']:34} {r['ms']:8.3f} ms {r['GB_per_s']:6.0f} GB/s "
        f"{r['TFLOP_per_s']:6.1f} TFLOP/s"
        for r in result["rows"]
    ]


def _volumes(path: Path) -> list[str]:
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    return [
        f"{r['provider']:30} {r['volume']}^3 batch {r['batch']}: {_num(r.get('ms_median'))} ms, "
        f"{_num(r.get('peak_mem_mb'))} MiB extra peak"
        for r in rows
    ]


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
