"""A 3-D classifier (CT, MRI): MONAI's DenseNet121 converted by fastdense, trained, then deployed.

    python examples/monai_3d.py [--volume 96] [--batch-size 2] [--steps 20] [--out densenet121_3d.pt]

Random volumes stand in for a data set (swap in MONAI's ``Dataset`` and transforms). The run converts the
model with ``fastdense.convert(strict=True)`` (every block, the stem and the transitions, or an error),
trains it, compares a training step's peak memory with the unconverted model's (counted by
``fastdense.estimate_peak_memory``: on fake tensors, for this device), then reverts it to MONAI's modules
(``fastdense.revert``: the same parameters) and saves it with TorchScript, as MONAI bundles deploy a model.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121

import fastdense

# The smallest edge the example is run at (tests/test_examples.py): its last dense block sees 2^3 voxels.
SMALLEST_VOLUME = 64


def training_step(model, optimizer, volumes, labels):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(volumes), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", type=int, default=96, help=f"edge of the cubic volumes (>= {SMALLEST_VOLUME})")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="densenet121_3d.pt", help="the TorchScript file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(0)
    monai_model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).to(device)
    model = fastdense.convert(copy.deepcopy(monai_model), strict=True)  # MONAI's keys, same checkpoints
    volumes = torch.randn(args.batch_size, 1, *[args.volume] * 3, device=device)
    labels = torch.randint(0, 2, (args.batch_size,), device=device)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(args.steps):
        loss = training_step(model.train(), optimizer, volumes, labels)
        print(f"step {step}: loss {loss:.4f}")

    peaks = [fastdense.estimate_peak_memory(m, volumes.shape, device=device.type) for m in (monai_model, model)]
    monai_peak, fast_peak = (peak / 2**20 for peak in peaks)
    print(
        f"a training step at {args.volume}^3, batch {args.batch_size}, peak memory (counted): MONAI "
        f"{monai_peak:.0f} MiB, fastdense {fast_peak:.0f} MiB ({fast_peak / monai_peak:.2f}x)"
    )

    deployed = fastdense.revert(model).eval()  # MONAI's own modules, holding the trained parameters
    scripted = torch.jit.script(deployed)
    scripted.save(args.out)
    with torch.no_grad():
        eager = deployed(volumes)
        difference = (torch.jit.load(args.out)(volumes) - eager).abs().max().item()
    if not torch.isfinite(eager).all():
        # Below 64^3 the last dense block sees one voxel a sample: MONAI's own model gives NaN in eval too.
        raise SystemExit(f"the trained model's eval output is not finite at --volume {args.volume}: MONAI's "
                         f"DenseNet121 does the same at that size (its last block sees {args.volume // 32}^3 voxels); "
                         f"use --volume {SMALLEST_VOLUME} or more")  # fmt: skip
    print(f"saved {args.out} (TorchScript, MONAI's DenseNet121): largest difference to eager {difference:.2e}")


if __name__ == "__main__":
    main()
