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
    """``80GiB``, ``80GB`` (taken as GiB), ``81920MiB``, a card's name (``CARDS``), or ``device`` (this
    machine's GPU, as CUDA reports it), in bytes."""
    if text.lower() == "device":
        if not torch.cuda.is_available():
            raise ValueError("memory: 'device' needs a CUDA GPU")
        return torch.cuda.get_device_properties(0).total_memory
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


def line(provider: str, setting: Setting) -> dict:
    """Peak memory as an affine function of the batch (2-D) or of the voxels (3-D), from two counts."""
    first, second = (32, 64) if setting.volumes else (8, 16)
    units = (lambda edge: edge**3) if setting.volumes else (lambda batch: batch)
    low, high = count(provider, setting, first), count(provider, setting, second)
    per_unit = (int(high) - int(low)) / (units(second) - units(first))
    extra_per_unit = (high.extra - low.extra) / (units(second) - units(first))
    return {
        "per_unit_bytes": per_unit, "fixed_bytes": int(low) - per_unit * units(first),
        # the step's own peak, less what was in use before it (what a benchmark measures), on its own line
        "extra_per_unit_bytes": extra_per_unit, "extra_fixed_bytes": low.extra - extra_per_unit * units(first),
        "counts": {first: int(low), second: int(high)},
    }  # fmt: skip


def largest(provider: str, setting: Setting, fit: dict, limit: int) -> dict:
    """The largest batch (2-D) or volume edge (3-D) whose counted peak stays within ``limit`` bytes: solved
    on the line, then counted there (and stepped down while the count says it does not fit)."""
    per_unit, base = fit["per_unit_bytes"], fit["fixed_bytes"]
    solved = (limit - base) / per_unit if per_unit > 0 else math.inf
    size = (int(max(solved, 0) ** (1 / 3)) // VOLUME_STEP * VOLUME_STEP) if setting.volumes else int(solved)
    step = VOLUME_STEP if setting.volumes else max(1, size // 100)
    checked = count(provider, setting, size) if size > 0 else None
    while checked is not None and int(checked) > limit and size > step:  # the line overshot: step down
        size -= step
        checked = count(provider, setting, size)
    fits = checked is not None and int(checked) <= limit
    return {
        "largest": size if fits else 0,
        "peak_bytes": int(checked) if checked is not None else None,
        "by_category": checked.by_category if checked is not None else {},
    }


def run(setting: Setting, providers: list[str], memories: list[int], reserve: Reserve) -> dict:
    """Each provider's line, then its largest batch (or volume) in each of ``memories``."""
    rows = []
    for provider in providers:
        fit = line(provider, setting)
        cards = [largest(provider, setting, fit, reserve.limit(m)) | {"memory_bytes": m} for m in memories]
        rows.append({"provider": provider, **fit, "cards": cards})
    return {"setting": asdict(setting), "memories": memories, "reserve": asdict(reserve), "rows": rows,
            "note": "counted on fake tensors (a count, not a measurement)"}  # fmt: skip


def print_table(result: dict) -> None:
    setting, rows = result["setting"], result["rows"]
    volumes = setting["model"] in VOLUME_MODELS
    what = f"largest cubic volume at batch {setting['batch']}" if volumes else "largest batch"
    mode = "training" if setting["train"] else "inference"
    images = "volumes" if volumes else f"{setting['resolution']}x{setting['resolution']}"
    reserve = result["reserve"]
    print(f"{setting['model']} {mode}, {setting['dtype']}, {images}, {setting['optimizer']}: {what}, counted "
          f"(reserve {reserve['fixed'] / GiB:.1f} GiB + {reserve['fraction']:.0%} of the peak)")  # fmt: skip
    print(f"  {'provider':34}" + "".join(f"{m / GiB:>14.0f} GiB" for m in result["memories"]))
    for row in rows:
        cells = []
        for card, base in zip(row["cards"], rows[0]["cards"], strict=True):
            size = f"{card['largest']}^3" if volumes else str(card["largest"])
            ratio = f"({card['largest'] / base['largest']:.2f}x)" if base["largest"] else ""
            cells.append(f"{size:>9} {ratio:>8}")
        print(f"  {row['provider']:34}" + "".join(cells))
    last = result["memories"][-1] / GiB
    print(f"at {last:.0f} GiB, the counted peak by category (GiB):")
    for row in rows:
        split = ", ".join(f"{k} {v / GiB:.1f}" for k, v in row["cards"][-1]["by_category"].items() if v >= GiB / 20)
        print(f"  {row['provider']:34} {split}")


def plot(result: dict, path: str) -> None:
    """Counted peak memory against batch (or volume edge) per provider, with the card's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = result["setting"]["model"] in VOLUME_MODELS
    fig, ax = plt.subplots(figsize=(7, 4.5))
    memory = max(result["memories"])
    for row in result["rows"]:
        top = max(row["cards"][-1]["largest"] * 1.3, 16)
        xs = [top * i / 40 for i in range(1, 41)]
        ys = [(row["fixed_bytes"] + row["per_unit_bytes"] * (x**3 if volumes else x)) / GiB for x in xs]
        ax.plot(xs, ys, label=row["provider"])
    for m in result["memories"]:
        ax.axhline(m / GiB, color="black", linestyle="--", linewidth=0.8)
        ax.axhline(Reserve(**result["reserve"]).limit(m) / GiB, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("volume edge (voxels)" if volumes else "batch")
    ax.set_ylabel("counted peak memory (GiB; cards dashed, less the reserve dotted)")
    ax.set_ylim(0, memory / GiB * 1.3)
    ax.set_title(f"{result['setting']['model']}: counted, not measured")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from . import describe

    parser = argparse.ArgumentParser(prog="python -m fastdense fit", description=describe(__doc__))
    parser.add_argument("--model", default="densenet121", choices=sorted(MODELS) + sorted(VOLUME_MODELS))
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="autocast dtype (float32: none)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--resolution", type=int, default=224, help="2-D: the image edge")
    parser.add_argument("--batch", type=int, default=2, help="3-D: the batch of the volume search")
    parser.add_argument(
        "--memory", nargs="+", default=["80GiB"],
        help=f"one or more of 80GiB, 24GB, 16384MiB, a card ({', '.join(CARDS)}), or 'device' (this machine's GPU)",
    )  # fmt: skip
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
        memories = [parse_memory(text) for text in args.memory]
    except ValueError as error:
        parser.error(str(error))
    result = run(setting, providers, memories, Reserve(int(args.reserve_gib * GiB), args.reserve_fraction))
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
