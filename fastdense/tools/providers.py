"""The implementations a benchmark compares, under fixed names used in every table and JSON file."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

import fastdense

# name: (growth_rate, block_config, num_init_features). "densenet-tiny" keeps tests and smoke runs fast.
MODELS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
    "densenet-tiny": (8, (2, 2, 2, 2), 16),
}


@dataclass(frozen=True)
class Provider:
    name: str
    library: str  # "torchvision" or "fastdense"
    memory_efficient: bool = False
    compile_mode: str | None = None  # torch.compile mode; None runs eagerly
    cuda_only: bool = False
    fastdense_backend: str = "auto"  # fastdense's backend= argument
    cuda_graph: bool = False  # the whole step captured in one CUDA graph after warm-up, then replayed

    def build(self, model: str) -> nn.Module:
        """A fresh model (random weights, torchvision's initialisation) of this provider's library."""
        growth_rate, block_config, num_init_features = MODELS[model]
        args = (growth_rate, block_config, num_init_features)
        if self.library == "torchvision":
            return torchvision.models.DenseNet(*args, memory_efficient=self.memory_efficient)
        return fastdense.FastDenseNet(*args, memory_efficient=self.memory_efficient, backend=self.fastdense_backend)

    def wrap(self, model: nn.Module):
        """What the benchmark calls: the model itself, or its torch.compile wrapper."""
        return model if self.compile_mode is None else torch.compile(model, mode=self.compile_mode)

    def backend(self, model: nn.Module) -> str:
        name = (model.active_backend or model.backend) if self.library == "fastdense" else "torchvision"
        name = name if self.compile_mode is None else f"{name}+inductor"
        return f"{name}+cuda-graph" if self.cuda_graph else name

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" or not self.cuda_only


PROVIDERS = {
    p.name: p
    for p in (
        Provider("torchvision-eager", "torchvision"),
        Provider("torchvision-memory-efficient", "torchvision", memory_efficient=True),
        Provider("torch-compile", "torchvision", compile_mode="default"),
        Provider("torch-compile-max-autotune", "torchvision", compile_mode="max-autotune", cuda_only=True),
        Provider("torch-compile-reduce-overhead", "torchvision", compile_mode="reduce-overhead", cuda_only=True),
        Provider("fastdense", "fastdense"),
        Provider("fastdense-memory-efficient", "fastdense", memory_efficient=True),
        Provider("fastdense-compile", "fastdense", compile_mode="default"),
        Provider("fastdense-triton", "fastdense", cuda_only=True, fastdense_backend="triton"),
        Provider(
            "fastdense-triton-compile", "fastdense", compile_mode="default", cuda_only=True, fastdense_backend="triton"
        ),
        Provider(
            "fastdense-triton-memory-efficient",
            "fastdense",
            memory_efficient=True,
            cuda_only=True,
            fastdense_backend="triton",
        ),
        # A whole step (forward, loss, backward, optimizer; or an inference call) captured in a CUDA graph
        # after warm-up (autotuning done): what is left of a step once its launches cost no host time.
        Provider("torchvision-cuda-graph", "torchvision", cuda_only=True, cuda_graph=True),
        Provider("fastdense-cuda-graph", "fastdense", cuda_only=True, cuda_graph=True, fastdense_backend="torch"),
        Provider(
            "fastdense-triton-cuda-graph", "fastdense", cuda_only=True, cuda_graph=True, fastdense_backend="triton"
        ),
    )
}
BASELINE = "torchvision-eager"  # every ratio in a report is against it


def providers_for(device: torch.device) -> list[str]:
    return [name for name, p in PROVIDERS.items() if p.available(device)]
