"""The torch backend on CUDA against torchvision on CUDA. Skipped, with the reason printed (``-rs``),
on machines without a GPU; ``benchmarks/gpu_check.sh`` runs it on the GPU machine. These are not
counted as coverage on the CPU machines: the CPU tests cover the same code paths there."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fastdense
from fastdense.verify import compare, randomize_batchnorm

from .test_densenet import network_pair
from .test_dtypes import check_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_check.sh)")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
def test_network_float64_on_cuda(training, memory_efficient):
    ref, fast = network_pair(memory_efficient=memory_efficient)
    ref, fast = ref.cuda(), fast.cuda()
    inputs = [torch.randn(4, 3, 45, 37, dtype=torch.float64, device="cuda") for _ in range(2)]
    errors = compare(fast, ref, inputs, training)
    assert max(errors.values()) <= 1e-9, errors
    assert fast.active_backend == "torch"


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16", "autocast-bf16", "autocast-fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_network_precision_on_cuda(precision, training):
    check_precision(lambda dt, seed: network_pair(dt, seed=seed), (16, 3, 64, 64), precision, training, "cuda")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_densenet121_bf16_autocast_channels_last(training):
    """A realistic size: densenet121, batch 32, 224x224, channels_last, bf16 autocast."""
    torch.manual_seed(0)
    ref = randomize_batchnorm(torchvision.models.densenet121()).cuda().to(memory_format=torch.channels_last)
    fast = fastdense.densenet121().cuda().to(memory_format=torch.channels_last)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(32, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    outputs = {}
    for name, model, autocast in (("fp32", ref, False), ("tv", ref, True), ("fast", fast, True)):
        model.train(training)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            outputs[name] = model(x).float()
    tv_err = (outputs["tv"] - outputs["fp32"]).norm() / outputs["fp32"].norm()
    fast_err = (outputs["fast"] - outputs["fp32"]).norm() / outputs["fp32"].norm()
    assert fast_err <= 2 * tv_err, (fast_err, tv_err)
