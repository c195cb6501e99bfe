"""Lower precision: float32, bfloat16, float16 and CPU autocast against torchvision in the same precision.

Both models are measured against a higher-precision torchvision run on the same weights and inputs
(float32 for bfloat16, float16 and autocast, float64 for float32). fastdense may be no worse than twice
torchvision's own error in that precision (and, in float32, within 1e-5 in any case).

Gradient errors are dominated by ReLU masks (and max-pool choices) that flip on rounding: discrete
events, so the error of a single run is heavy-tailed for both libraries, and which library flips on
a given seed is chance. The comparison is therefore made over several seeds: in bfloat16, where
every run of these shapes sees many flips, on the mean error; in float32, where a flip needs a
pre-activation within about 1e-7 of zero and is rare, on the median error, so that one seed's
coin-flip does not decide.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import pytest
import torch

from fastdense.tools.verify import relative_error

from .helpers import block_pair
from .test_densenet import network_pair

SEEDS = range(8)
# name: (dtype of both models, autocast dtype or None, reference dtype, error floor, statistic)
PRECISIONS = {
    "float32": (torch.float32, None, torch.float64, 1e-5, statistics.median),
    "bfloat16": (torch.bfloat16, None, torch.float32, 0.0, statistics.mean),
    "float16": (torch.float16, None, torch.float32, 0.0, statistics.mean),
    "autocast-bf16": (torch.float32, torch.bfloat16, torch.float32, 0.0, statistics.mean),
    "autocast-fp16": (torch.float32, torch.float16, torch.float32, 0.0, statistics.mean),
}
CPU_PRECISIONS = ["float32", "bfloat16", "float16", "autocast-bf16"]  # CPU autocast is bfloat16 only


def run(model, x, *, training, autocast):
    """Output, input gradient, all parameter gradients (one flat vector) and running statistics."""
    model.train(training)
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).view(out.shape)
    (out.double() * weights).sum().backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    stats = torch.cat([b.double().flatten() for b in model.buffers() if b.is_floating_point()])
    model.zero_grad(set_to_none=True)
    return {"output": out.double(), "input grad": x.grad.double(), "param grads": grads, "running stats": stats}


def check_precision(make_pair, input_shape, precision, training, device="cpu", seeds=SEEDS):
    dtype, autocast, gold_dtype, floor, statistic = PRECISIONS[precision]
    errors = {"torchvision": defaultdict(list), "fastdense": defaultdict(list)}
    for seed in seeds:
        x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
        gold_ref, _ = make_pair(gold_dtype, seed)
        gold = run(gold_ref.to(device), x.to(gold_dtype), training=training, autocast=None)
        for name, model in zip(errors, make_pair(dtype, seed), strict=True):
            result = run(model.to(device), x.to(dtype), training=training, autocast=autocast)
            for key in gold:
                errors[name][key].append(relative_error(result[key], gold[key]))
    ref_err = {key: statistic(values) for key, values in errors["torchvision"].items()}
    fast_err = {key: statistic(values) for key, values in errors["fastdense"].items()}
    for key in ref_err:
        assert fast_err[key] <= max(floor, 2 * ref_err[key]), (key, fast_err, ref_err)


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_precision(precision, training):
    shape = (4, 6, 9, 7) if precision == "float32" else (8, 16, 13, 11)
    check_precision(lambda dt, seed: block_pair(4, shape[1], 4, 8, dtype=dt, seed=seed), shape, precision, training)


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_network_precision(precision, training):
    shape = (2, 3, 32, 32) if precision == "float32" else (8, 3, 64, 64)
    check_precision(lambda dt, seed: network_pair(dt, seed=seed), shape, precision, training)


def test_autocast_keeps_float32_buffer_for_float32_input():
    """Under autocast a float32 block input keeps a float32 buffer (as torch.cat of mixed inputs would)
    while the convolutions run in bfloat16."""
    _, fast = block_pair(2, 4, 2, 3, dtype=torch.float32)
    fast.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, fast(x))  # the new features did run in bfloat16
