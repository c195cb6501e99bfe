"""Counted cost of a converted torchvision or timm densenet121 against the built one (on fake tensors: a
count of launches and bytes, and a training peak, never a time).

    PYTHONPATH=. python benchmarks/count_converted.py [--backend triton] [--batch 64]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torchvision

import fastdense
from fastdense.tools import providers, traffic


def original(library: str) -> torch.nn.Module:
    if library == "timm":
        import timm

        return timm.create_model("densenet121")
    return torchvision.models.densenet121()


@dataclass(frozen=True)
class Converted(providers.Provider):
    """A provider whose model is ``fastdense.convert`` of torchvision's or timm's densenet121."""

    source: str = "torchvision"

    def build(self, model: str) -> torch.nn.Module:
        return fastdense.convert(original(self.source), backend=self.fastdense_backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton", choices=["torch", "triton"])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    built = "fastdense-triton" if args.backend == "triton" else "fastdense"
    for library in ("torchvision", "timm"):
        name = f"converted-{library}"
        providers.PROVIDERS[name] = Converted(name, "fastdense", fastdense_backend=args.backend, source=library)
    settings = {"autocast_dtype": torch.bfloat16, "channels_last": True}
    shape = (args.batch, 3, 224, 224)
    for name in (built, "converted-torchvision", "converted-timm"):
        for mode in ("train", "infer"):
            t = traffic.count_step(name, "densenet121", mode, args.batch, 224, "bfloat16")
            floor = t.floors.get("H200, data sheet", float("nan")) * 1e3
            print(f"{name:22} {mode:5} launches {t.launches:4}  GB {t.bytes / 1e9:6.2f}  compulsory GB "
                  f"{t.compulsory_bytes / 1e9:6.2f}  H200 floor {floor:.2f} ms", flush=True)  # fmt: skip
        model = providers.PROVIDERS[name].build("densenet121")
        peak = fastdense.estimate_peak_memory(model, shape, **settings)
        print(f"{name:22} train peak {int(peak) / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
