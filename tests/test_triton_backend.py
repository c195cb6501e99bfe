"""``backend="triton"`` against torchvision: FastDenseBlock and a small FastDenseNet, forward in training
and eval mode (outputs, running statistics) and training through the torch backend's backward on the
Triton forward's saved state. On the CPU these run in the Triton interpreter (see the root conftest);
``benchmarks/gpu_check.sh`` runs the same file on the GPU, compiled."""

from __future__ import annotations

import pytest
import torch

from fastdense.kernels.launch import INTERPRET
from fastdense.tools.verify import compare
from fastdense.triton_ops import CONV3X3_ENV_VAR

from .helpers import block_pair
from .test_densenet import network_pair
from .test_dtypes import check_precision

DEVICE = "cpu" if INTERPRET else "cuda"
FP32_TOL = 1e-5


@pytest.fixture(params=["triton", "cudnn"], ids=["conv-triton", "conv-cudnn"])
def conv3x3(request, monkeypatch):
    """Both 3x3 convolutions of the triton backend: the implicit GEMM and PyTorch's (cuDNN on a GPU)."""
    monkeypatch.setenv(CONV3X3_ENV_VAR, request.param)
    return request.param


def to_device(pair):
    return tuple(model.to(DEVICE) for model in pair)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", [(3, 5, 2, 3, (2, 5, 7)), (2, 1, 1, 1, (3, 1, 4)), (2, 6, 3, 17, (1, 9, 3))])
def test_block_float32(config, training, memory_efficient, conv3x3):
    """Odd shapes: C0 = 1, growth 1, H = 1, k larger than the conv's column block.

    Forward (output, running statistics) within 1e-5 of torchvision; gradients as accurate as
    torchvision's own float32 gradients against float64 (a one-channel BatchNorm over 12 values is
    ill-conditioned for both libraries), by ``check_precision``."""
    num_layers, c0, bn_size, growth, (n, h, w) = config

    def make_pair(dtype, seed):
        return to_device(block_pair(num_layers, c0, bn_size, growth, dtype=dtype, seed=seed, backend="triton",
                                    memory_efficient=memory_efficient))  # fmt: skip

    ref, fast = make_pair(torch.float32, 0)
    errors = compare(fast, ref, [torch.randn(n, c0, h, w, device=DEVICE) for _ in range(2)], training)
    assert fast.active_backend == "triton"
    assert max(errors["output"], errors["running_stats"], errors["num_batches_tracked"]) <= FP32_TOL, errors
    check_precision(make_pair, (n, c0, h, w), "float32", training, DEVICE, seeds=range(5))


def test_block_dropout_keeps_the_torch_backends_distribution():
    """Dropout noise is drawn as in the torch backend, so the same seed gives the same output."""
    _, fast = block_pair(2, 4, 2, 3, dtype=torch.float32, drop_rate=0.5, backend="triton")
    _, twin = block_pair(2, 4, 2, 3, dtype=torch.float32, drop_rate=0.5, backend="torch")
    fast, twin = fast.to(DEVICE), twin.to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    torch.manual_seed(3)
    out = fast(x)
    torch.manual_seed(3)
    expected = twin(x)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert (out[:, 4:] == 0).any()


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "autocast-bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_low_precision(precision, training):
    shape = (4, 16, 7, 5)
    check_precision(
        lambda dt, seed: to_device(block_pair(3, shape[1], 4, 8, dtype=dt, seed=seed, backend="triton")),
        shape, precision, training, DEVICE, seeds=range(6),
    )  # fmt: skip


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_network_float32(training, memory_efficient):
    def make_pair(dtype, seed):
        return to_device(network_pair(dtype, seed=seed, memory_efficient=memory_efficient, backend="triton"))

    ref, fast = make_pair(torch.float32, 0)
    errors = compare(fast, ref, [torch.randn(2, 3, 37, 45, device=DEVICE) for _ in range(2)], training)
    assert fast.active_backend == "triton"
    assert max(errors["output"], errors["running_stats"], errors["num_batches_tracked"]) <= FP32_TOL, errors
    check_precision(make_pair, (2, 3, 37, 45), "float32", training, DEVICE, seeds=range(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_network_inference_uses_the_fused_transition(training):
    """Under no_grad the transition is one kernel (pool in the GEMM prologue); outputs and running
    statistics still match torchvision."""
    ref, fast = to_device(network_pair(torch.float32, backend="triton"))
    ref.train(training), fast.train(training)
    x = torch.randn(3, 3, 40, 33, device=DEVICE)
    with torch.no_grad():
        out, expected = fast(x), ref(x)
    assert (out - expected).norm() / expected.norm() <= FP32_TOL
    for (name, buf), ref_buf in zip(fast.named_buffers(), ref.buffers(), strict=True):
        assert torch.allclose(buf.double(), ref_buf.double(), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_network_low_precision_training(precision):
    shape = (4, 3, 32, 32)
    check_precision(
        lambda dt, seed: to_device(network_pair(dt, seed=seed, backend="triton")),
        shape, precision, True, DEVICE, seeds=range(4),
    )  # fmt: skip


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_and_non_finite_values_as_torchvision(training):
    """N = 0 gives torchvision's empty output; NaN and Inf propagate to the same positions."""
    ref, fast = to_device(block_pair(2, 3, 2, 3, dtype=torch.float32, backend="triton"))
    ref.train(training), fast.train(training)
    empty = torch.randn(0, 3, 4, 4, device=DEVICE)
    assert fast(empty).shape == ref(empty).shape == (0, 9, 4, 4)
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    x[0, 1, 2, 2], x[1, 0, 0, 0] = float("nan"), float("inf")
    with torch.no_grad():
        out, expected = fast(x), ref(x)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert torch.allclose(out[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
def test_block_dropout_backward_matches_the_torch_backend(memory_efficient):
    """With the same seed both backends draw the same dropout mask; the triton backward (finalize
    kernel multiplying by the saved noise) gives the torch backend's gradients."""
    grads = {}
    for backend in ("torch", "triton"):
        _, block = block_pair(3, 4, 2, 3, dtype=torch.float32, drop_rate=0.4, backend=backend,
                              memory_efficient=memory_efficient)  # fmt: skip
        block = block.to(DEVICE).train()
        torch.manual_seed(11)
        x = torch.randn(2, 4, 5, 6, device=DEVICE, requires_grad=True)
        out = block(x)
        out.square().sum().backward()
        grads[backend] = [x.grad, *(p.grad for p in block.parameters())]
    for got, want in zip(grads["triton"], grads["torch"], strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
