"""The torch and triton backends on CUDA against torchvision on CUDA, at realistic sizes. Skipped, with
the reason printed (``-rs``), on machines without a GPU; ``benchmarks/gpu_check.sh`` runs it on the GPU
machine. These are not counted as coverage on the CPU machines: the CPU tests cover the same code paths
there (the Triton kernels in the interpreter, on small shapes)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fastdense
from fastdense.tools.verify import compare, randomize_batchnorm

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


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_backend_imagenet_variants_bf16_autocast(name, training):
    """backend="triton" end to end (autotuned kernels) for the four ImageNet variants: forward in
    training and eval mode, bf16 autocast, channels_last, and a training step's input gradient, each at
    most twice torchvision's own bf16 error against its fp32 result; running statistics too."""
    torch.manual_seed(0)
    ref = randomize_batchnorm(getattr(torchvision.models, name)()).cuda().to(memory_format=torch.channels_last)
    fast = getattr(fastdense, name)(backend="triton").cuda().to(memory_format=torch.channels_last)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    results = {}
    state = {k: v.clone() for k, v in ref.state_dict().items()}  # each run starts from the same statistics
    for label, model, autocast in (("fp32", ref, False), ("tv", ref, True), ("fast", fast, True)):
        model.load_state_dict(state)
        model.train(training)
        inp = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(inp)
        out.float().square().mean().backward()
        stats = torch.cat([b.flatten().float() for b in model.buffers() if b.is_floating_point()])
        results[label] = (out.float().detach(), inp.grad.float(), stats)
    assert fast.active_backend == "triton"
    for i, what in enumerate(("output", "input grad", "running stats")):
        gold = results["fp32"][i]
        tv_err = ((results["tv"][i] - gold).norm() / gold.norm()).item()
        fast_err = ((results["fast"][i] - gold).norm() / gold.norm()).item()
        assert fast_err <= max(2 * tv_err, 1e-6), (what, fast_err, tv_err)


def test_triton_kernels_past_2_31_elements():
    """A buffer whose M * C_total exceeds 2^31 elements: the kernels' int64 row offsets reach its last
    rows (checked there against PyTorch), and the statistics and sums their last programs merge cover every
    row."""
    from fastdense.batchnorm import NormMap
    from fastdense.kernels.bn_relu_gemm import bn_relu_gemm, bn_relu_gemm_reference
    from fastdense.kernels.conv3x3 import conv3x3, conv3x3_reference
    from fastdense.kernels.stats import column_stats

    m, c_total, c_in = 8_400_000, 264, 256  # M * C_total = 2.2e9 > 2^31 (4.4 GB in bf16)
    assert m * c_total > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(m, c_total, device="cuda", dtype=torch.bfloat16, generator=g)
    vectors = [torch.randn(c_in, device="cuda", generator=g) for _ in range(4)]
    norm = NormMap(vectors[0], vectors[1].abs() + 0.5, vectors[2], vectors[3])
    weight = torch.randn(128, c_in, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    stats = torch.empty(3, 128, device="cuda")
    y = bn_relu_gemm(buf[:, :c_in], norm, weight, stats=stats, stats_eps=1e-5)
    tail = slice(m - 4096, m)
    expected = bn_relu_gemm_reference(buf[tail, :c_in], norm, weight)
    assert ((y[tail].float() - expected.float()).norm() / expected.float().norm()).item() <= 2e-3
    ref_var, ref_mean = torch.var_mean(y.float(), dim=0, correction=0)
    mean, rstd, var = stats
    assert torch.allclose(mean, ref_mean, rtol=1e-4, atol=1e-4) and torch.allclose(var, ref_var, rtol=1e-4)
    assert torch.allclose(rstd, torch.rsqrt(ref_var + 1e-5), rtol=1e-4)
    del y
    stats_mean, _, stats_var = column_stats(buf[:, c_in:])
    ref_var, ref_mean = torch.var_mean(buf[:, c_in:].float(), dim=0, correction=0)
    assert torch.allclose(stats_mean, ref_mean, atol=1e-4) and torch.allclose(stats_var, ref_var, rtol=1e-4)
    # The 3x3 conv writes the last 8 columns; images of 100 x 84 rows so the last rows are a whole image.
    bottleneck = buf[:, :128].contiguous()
    w2 = torch.randn(8, 128, 3, 3, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    conv3x3(bottleneck, w2, (1000, 100, 84), buf[:, c_in:], prologue=norm.channels(0, 128))
    last_image = slice(m - 8400, m)
    expected = conv3x3_reference(bottleneck[last_image], w2, (1, 100, 84), prologue=norm.channels(0, 128))
    got = buf[last_image, c_in:].float()
    assert ((got - expected.float()).norm() / expected.float().norm()).item() <= 2e-3
    del bottleneck
    # Backward: dgrad accumulates into an fp32 G of M x C_total (8.9 GB), wgrad reduces over every row,
    # finalize reads the last rows of G and the buffer.
    from fastdense.kernels.bn_relu_gemm_backward import norm1_gemm_backward, norm1_gemm_backward_reference
    from fastdense.kernels.finalize import finalize, finalize_reference

    grad_sum = torch.zeros(m, c_total, device="cuda")
    d_y = torch.randn(m, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    d_gamma, d_beta, d_w = (torch.empty(shape, device="cuda") for shape in (c_in, c_in, (128, c_in)))
    norm1_gemm_backward(d_y, buf[:, :c_in], norm, weight, grad_sum, d_gamma=d_gamma, d_beta=d_beta, d_weight=d_w)
    tail_sum = torch.zeros(4096, c_total, device="cuda")
    norm1_gemm_backward_reference(d_y[tail], buf[tail, :c_in], norm, weight, tail_sum, False)
    assert ((grad_sum[tail] - tail_sum).norm() / tail_sum.norm()).item() <= 1e-4
    ref = [torch.zeros(c_in, device="cuda"), torch.zeros(c_in, device="cuda"), torch.zeros_like(d_w)]
    for lo in range(0, m, 1 << 20):  # the reference in row chunks, to keep its memory small
        rows = slice(lo, min(lo + (1 << 20), m))
        scratch = torch.zeros(rows.stop - lo, c_in, device="cuda")
        parts = norm1_gemm_backward_reference(d_y[rows], buf[rows, :c_in], norm, weight, scratch, True)
        for total, part in zip(ref, parts, strict=True):
            total += part
    for name, got_, want in zip(("d_gamma", "d_beta", "dW"), (d_gamma, d_beta, d_w), ref, strict=True):
        assert ((got_ - want).norm() / want.norm()).item() <= 1e-3, name
    stats = (
        norm.mean,
        norm.inv,
        torch.randn(c_in, device="cuda", generator=g),
        torch.randn(c_in, device="cuda", generator=g),
    )
    out = torch.empty(m, c_in, device="cuda")
    finalize(grad_sum[:, :c_in], buf[:, :c_in], buf[:, :c_in], out, stats)
    expected = finalize_reference(grad_sum[tail, :c_in], buf[tail, :c_in], buf[tail, :c_in], stats)
    assert ((out[tail] - expected).norm() / expected.norm()).item() <= 1e-5


def test_triton_backend_sgd_steps_track_torchvision():
    """Three SGD steps of densenet121 (bf16 autocast, channels_last, batch 16) on the triton backend
    stay as close to torchvision's float32 run as torchvision's own bf16 run does (twice, at most)."""
    import copy

    torch.manual_seed(0)
    gold = randomize_batchnorm(torchvision.models.densenet121()).cuda().to(memory_format=torch.channels_last)
    tv = copy.deepcopy(gold)
    fast = fastdense.densenet121(backend="triton").cuda().to(memory_format=torch.channels_last)
    fast.load_state_dict(gold.state_dict())
    x = torch.randn(16, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (16,), device="cuda")

    def train(model, autocast):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return torch.cat([p.detach().flatten().float() for p in model.parameters()])

    start = torch.cat([p.detach().flatten().float() for p in gold.parameters()])
    gold_params, tv_params, fast_params = train(gold, False), train(tv, True), train(fast, True)
    assert fast.active_backend == "triton"
    step = (gold_params - start).norm()
    tv_err = ((tv_params - gold_params).norm() / step).item()
    fast_err = ((fast_params - gold_params).norm() / step).item()
    assert fast_err <= max(2 * tv_err, 1e-3), (fast_err, tv_err)
