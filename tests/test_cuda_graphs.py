"""CUDA graphs and ``torch.compile(mode="reduce-overhead")`` on fastdense models (GPU only; skipped with the
reason printed elsewhere; ``benchmarks/gpu_check.sh`` runs it). A captured step must replay to what eager
execution gives: nothing in a block's forward or backward may synchronise with the host or allocate
outside the graph's pool, and the buffers must be stable between replays."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fastdense
from fastdense.tools.verify import randomize_batchnorm, relative_error

from .test_densenet import SMALL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_check.sh)")

BACKENDS = ["torch", "triton"]


def small_model(backend: str) -> fastdense.FastDenseNet:
    torch.manual_seed(0)
    model = fastdense.FastDenseNet(**SMALL, backend=backend)
    return randomize_batchnorm(model, torch.Generator().manual_seed(1)).cuda()


def eager_step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_captured_in_a_cuda_graph_replays_like_eager(backend):
    model = small_model(backend).train()
    reference = copy.deepcopy(model)
    static_x = torch.randn(8, 3, 32, 32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (autotuning, lazy initialisation)
        for _ in range(3):
            eager_step(model, static_x)
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
        static_out.square().sum().backward()
    for seed in (1, 2):
        x = torch.randn(8, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        static_x.copy_(x)
        graph.replay()
        out, grads = eager_step(reference, x)
        assert relative_error(static_out, out) <= 1e-5
        for name, param in model.named_parameters():
            assert relative_error(param.grad, grads[name]) <= 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_captured_in_a_cuda_graph(backend):
    model = small_model(backend).eval()
    static_x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        model(static_x)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        assert relative_error(static_out, model(x)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_overhead_compile_trains_like_torchvision(backend):
    """torch.compile(mode="reduce-overhead", fullgraph=True): Inductor plus CUDA graphs, three SGD steps,
    against torchvision's eager steps in float32 (TF32 off on both)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = small_model(backend)
        ref = torchvision.models.DenseNet(**SMALL).cuda()
        ref.load_state_dict(model.state_dict())
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, ref)]
        for step in range(3):
            x = torch.randn(8, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
            for net, optimizer in zip((compiled, ref), optimizers, strict=True):
                optimizer.zero_grad(set_to_none=True)
                net(x).square().mean().backward()
                optimizer.step()
        ref_state = ref.state_dict()
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                assert relative_error(value, ref_state[name]) <= 1e-4, name
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True


@pytest.mark.parametrize("backend", BACKENDS)
def test_benchmarks_graphed_training_step_trains_like_torchvision(backend):
    """The benchmark's CUDA-graph providers (``fastdense.tools.measure.graphed_step``): a whole training step
    (forward, cross-entropy, backward, SGD with momentum) captured once and replayed trains as torchvision's
    eager steps do, in float32: after the warm-up steps and two replays, the same parameters, buffers and
    momentum within 1e-4."""
    from fastdense.tools.measure import WARMUP_STEPS, graphed_step, make_step

    model = small_model(backend)
    ref = torchvision.models.DenseNet(**SMALL).cuda()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    steps = []
    for net in (model, ref):
        torch.manual_seed(4)  # the same targets
        steps.append(make_step(net, x, "train", torch.float32, net.parameters(), cache_casts=False,
                               classes=SMALL["num_classes"]))  # fmt: skip
    replay, peak = graphed_step(steps[0], x.device)
    assert peak > 0
    for _ in range(WARMUP_STEPS):  # (the capture itself runs nothing)
        steps[1]()
    for _ in range(2):
        replay()
        steps[1]()
    ref_state = ref.state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            assert relative_error(value, ref_state[name]) <= 1e-4, name
