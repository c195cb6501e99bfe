"""The GPU check's first stage: both backends against torchvision on DenseNet-121 at a realistic size.

On a GPU: densenet121, batch 32, 224x224, channels_last, for the torch and the triton backend, in
bfloat16 autocast and in float32 (TF32 off: ``tests/conftest.py``), training and eval mode. Each run's
output, input gradient, every parameter gradient and the running statistics are measured against a
higher-precision torchvision run on the same weights and input (float32 for bfloat16, float64 for
float32), and fastdense may be no worse than twice torchvision's own error in that precision
(``test_dtypes.check_precision``). ``benchmarks/gpu_check.sh`` runs this with ``FASTDENSE_AUTOTUNE=0``
(one configuration per kernel: a minute of compiling, no tuning); the autotuned kernels are checked by the
benchmark stages' ``max_rel_err`` against torchvision in float64.

On the CPU (CI, and the check's rehearsal) the same comparisons run on a small DenseNet at 32x32, the
triton backend in the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fastdense
from fastdense.tools.verify import randomize_batchnorm

from .test_densenet import network_pair
from .test_dtypes import check_precision

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = (32, 3, 224, 224) if CUDA else (2, 3, 32, 32)
SEEDS = range(2)


def _pair_maker(backend: str, built: list):
    def pair(dtype, seed):
        if CUDA:
            torch.manual_seed(seed)
            ref = randomize_batchnorm(torchvision.models.densenet121(), torch.Generator().manual_seed(seed + 1))
            fast = fastdense.densenet121(backend=backend)
            fast.load_state_dict(ref.state_dict())
        else:
            ref, fast = network_pair(seed=seed, backend=backend)
        built.append(fast)
        return tuple(m.to(DEVICE, dtype).to(memory_format=torch.channels_last) for m in (ref, fast))

    return pair


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("precision", ["autocast-bf16", "float32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_both_backends_against_torchvision(backend, precision, training):
    built = []
    check_precision(_pair_maker(backend, built), SHAPE, precision, training, DEVICE, seeds=SEEDS)
    # check_precision builds a pair for its higher-precision torchvision run too (that fastdense model never
    # runs), then the compared pair: every second model built is a compared one.
    assert {model.active_backend for model in built[1::2]} == {backend}
