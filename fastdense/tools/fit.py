"""``python -m fastdense fit``: the largest batch (or 3-D volume) each implementation trains in on a given GPU,
counted on the CPU.

Each provider's step is counted on fake tensors by ``fastdense.estimate_peak_memory`` (PyTorch's
``MemTracker``; the torch backend takes a GPU's operator choices, the triton backend's buffers count as it
allocates them). Peak memory is affine in the batch (and in the voxels of a volume): two counts give the
line, the largest batch under the card's memory less a reserve follows, and a third count at that batch
checks it (stepping down while the count says it does not fit).

The reserve is what the count cannot see: ``--reserve-gib`` (default 1 GiB: the CUDA context, 0.3-0.7 GB
with lazy module loading and up to 1 GB without, pytorch/pytorch#107667 and #37250, plus cuDNN's
workspace for a convolution) and ``--reserve-fraction`` of the peak (default 0.1: the caching allocator
rounds blocks up and fragments; its reserved memory runs above the allocated). A count, not a
measurement: ``benchmarks/gpu_check.sh`` puts it beside the measured largest batch on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass

import torch

from .measure import DTYPES
from .providers import MODELS, PROVIDERS
from .volumes import MODELS as VOLUME_MODELS

GiB = 2**30
# Named cards and their memory as their makers name it (GB; taken as GiB: the usable memory is a little
# less, which the reserve's fixed part covers).
CARDS = {
    "t4": 16, "v100-16gb": 16, "a10": 24, "l4": 24, "rtx4090": 24, "a100-40gb": 40, "a6000": 48, "l40s": 48,
    "a100-80gb": 80, "h100-80gb": 80, "h100-nvl": 94, "h200": 141,
}  # fmt: skip
PROVIDERS_2D = ("torchvision-eager", "torchvision-memory-efficient", "fastdense", "fastdense-memory-efficient",
                "fastdense-triton", "fastdense-triton-memory-efficient")  # fmt: skip
PROVIDERS_3D = ("monai-eager", "fastdense", "fastdense-memory-efficient")
VOLUME_STEP = 16  # 3-D edges are searched in steps of 16 voxels


@dataclass
class Setting:
    model: str = "densenet121"
    train: bool = True
    optimizer: str = "sgd"
    dtype: str = "bfloat16"
    channels_last: bool = True
    resolution: int = 224  # 2-D: the image edge
    batch: int = 2  # 3-D: the batch at which the largest volume is searched
    device: str = "cuda"

    @property
    def volumes(self) -> bool:
        return self.model in VOLUME_MODELS


@dataclass
class Reserve:
    fixed: int = GiB
    fraction: float = 0.1

    def limit(self, memory: int) -> int:
        """The largest counted peak that fits in ``memory`` with this reserve."""
        return int((memory - self.fixed) / (1 + self.fraction))


def parse_memory(text: str) -> int:
    """``80GiB``, ``80GB`` (taken as GiB), ``81920MiB``, or a card's name (``CARDS``), in bytes."""
    if text.lower() in CARDS:
        return CARDS[text.lower()] * GiB
    found = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|G|MiB|MB|M)\s*", text, re.I)
    if not found:
        raise ValueError(f"memory: expected e.g. 80GiB, 24GB, 16384MiB or a card ({', '.join(CARDS)}), got {text!r}")
    value, unit = float(found.group(1)), found.group(2).lower()
    return int(value * (GiB if unit.startswith("g") else 2**20))


def build(provider: str, setting: Setting) -> torch.nn.Module:
    if setting.volumes:
        from .volumes import build as build_volume_model

        return build_volume_model(provider, setting.model, torch.device("cpu"))
    return PROVIDERS[provider].build(setting.model)


def count(provider: str, setting: Setting, size: int):
    """The counted step of ``provider`` at batch ``size`` (2-D) or volume edge ``size`` (3-D)."""
    from fastdense.memory import estimate_peak_memory

    if setting.volumes:
        shape = (setting.batch, 1, size, size, size)
    else:
        shape = (size, 3, setting.resolution, setting.resolution)
    dtype = DTYPES[setting.dtype]
    return estimate_peak_memory(
        build(provider, setting), shape, train=setting.train, optimizer=setting.optimizer,
        autocast_dtype=None if dtype == torch.float32 else dtype, device=setting.device,
        channels_last=setting.channels_last,
    )  # fmt: skip


def largest(provider: str, setting: Setting, limit: int) -> dict:
    """The largest batch (2-D) or volume edge (3-D) whose counted peak stays within ``limit`` bytes."""
    if setting.volumes:  # affine in the voxels: count two edges, solve for the volume, round to the step

        def units(edge):
            return edge**3

        first, second = 32, 64
    else:

        def units(batch):
            return batch

        first, second = 8, 16
    low, high = count(provider, setting, first), count(provider, setting, second)
    per_unit = (int(high) - int(low)) / (units(second) - units(first))
    base = int(low) - per_unit * units(first)
    solved = (limit - base) / per_unit if per_unit > 0 else math.inf
    size = (int(solved ** (1 / 3)) // VOLUME_STEP * VOLUME_STEP) if setting.volumes else int(solved)
    step = VOLUME_STEP if setting.volumes else max(1, size // 100)
    checked = count(provider, setting, size) if size > 0 else None
    while checked is not None and int(checked) > limit and size > step:  # the line overshot: step down
        size -= step
        checked = count(provider, setting, size)
    fits = checked is not None and int(checked) <= limit
    return {
        "provider": provider,
        "largest": size if fits else 0,
        "peak_bytes": int(checked) if checked is not None else None,
        "by_category": checked.by_category if checked is not None else {},
        "per_unit_bytes": per_unit,
        "fixed_bytes": base,
        "counts": {first: int(low), second: int(high)},
    }


def run(setting: Setting, providers: list[str], memory: int, reserve: Reserve) -> dict:
    limit = reserve.limit(memory)
    rows = [largest(provider, setting, limit) for provider in providers]
    return {"setting": asdict(setting), "memory_bytes": memory, "reserve": asdict(reserve), "limit_bytes": limit,
            "rows": rows, "note": "counted on fake tensors (a count, not a measurement)"}  # fmt: skip


def print_table(result: dict) -> None:
    setting, rows = result["setting"], result["rows"]
    what = "largest cubic volume at batch {batch}" if setting["model"] in VOLUME_MODELS else "largest batch"
    mode = "training" if setting["train"] else "inference"
    images = "volumes" if setting["model"] in VOLUME_MODELS else f"{setting['resolution']}x{setting['resolution']}"
    print(f"{setting['model']} {mode}, {setting['dtype']}, {images}: {what.format(**setting)} in "
          f"{result['memory_bytes'] / GiB:.0f} GiB (counted peak at most {result['limit_bytes'] / GiB:.1f} GiB "
          "after the reserve)")  # fmt: skip
    base = rows[0]
    for row in rows:
        ratio = (row["largest"] / base["largest"]) if base["largest"] else float("nan")
        size = f"{row['largest']}^3" if setting["model"] in VOLUME_MODELS else str(row["largest"])
        split = ", ".join(f"{k} {v / GiB:.2f}" for k, v in row["by_category"].items() if v >= GiB / 100)
        peak = row["peak_bytes"] / GiB if row["peak_bytes"] else float("nan")
        print(f"  {row['provider']:34} {size:>8} ({ratio:.2f}x)  peak {peak:6.2f} GiB: {split}")


def plot(result: dict, path: str) -> None:
    """Counted peak memory against batch (or volume edge) per provider, with the card's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = result["setting"]["model"] in VOLUME_MODELS
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result["rows"]:
        top = max(row["largest"] * 1.3, 16)
        xs = [top * i / 40 for i in range(1, 41)]
        ys = [(row["fixed_bytes"] + row["per_unit_bytes"] * (x**3 if volumes else x)) / GiB for x in xs]
        ax.plot(xs, ys, label=row["provider"])
    ax.axhline(result["memory_bytes"] / GiB, color="black", linestyle="--", label="card")
    ax.axhline(result["limit_bytes"] / GiB, color="gray", linestyle=":", label="card less the reserve")
    ax.set_xlabel("volume edge (voxels)" if volumes else "batch")
    ax.set_ylabel("counted peak memory (GiB)")
    ax.set_ylim(0, result["memory_bytes"] / GiB * 1.5)
    ax.set_title(f"{result['setting']['model']}: counted, not measured")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdense fit", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121", choices=sorted(MODELS) + sorted(VOLUME_MODELS))
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="autocast dtype (float32: none)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--resolution", type=int, default=224, help="2-D: the image edge")
    parser.add_argument("--batch", type=int, default=2, help="3-D: the batch of the volume search")
    parser.add_argument("--memory", default="80GiB", help=f"80GiB, 24GB, 16384MiB or a card: {', '.join(CARDS)}")
    parser.add_argument("--reserve-gib", type=float, default=1.0, help="fixed reserve (CUDA context, cuDNN)")
    parser.add_argument("--reserve-fraction", type=float, default=0.1, help="reserve for fragmentation")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="whose operator choices count")
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    setting = Setting(args.model, args.mode == "train", args.optimizer, args.dtype, args.channels_last,
                      args.resolution, args.batch, args.device)  # fmt: skip
    choices = PROVIDERS_3D if setting.volumes else PROVIDERS_2D
    providers = args.providers or list(choices)
    unknown = sorted(set(providers) - set(choices))
    if unknown:
        parser.error(f"--providers for {args.model}: {' '.join(choices)} (not {' '.join(unknown)})")
    try:
        memory = parse_memory(args.memory)
    except ValueError as error:
        parser.error(str(error))
    result = run(setting, providers, memory, Reserve(int(args.reserve_gib * GiB), args.reserve_fraction))
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
