"""torch.compile(fullgraph=True) on fastdense models: the dense block is a registered operator
(``fastdense::dense_block`` and its backward, ``fastdense.block_op``) with a shape-only fake
implementation and an autograd formula, so compiling the whole model leaves no graph break.

CUDA graphs and ``mode="reduce-overhead"`` need a GPU: tests/test_cuda_graphs.py, run by gpu_check.sh."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fastdense
from fastdense.block_op import dense_block
from fastdense.tools.verify import compare, randomize_batchnorm, relative_error

from .test_densenet import SMALL


def block_op_args(spatial_dims: int, training: bool, save: bool, memory_efficient: bool, backend: str = "torch"):
    torch.manual_seed(0)
    block = randomize_batchnorm(fastdense.FastDenseBlock(2, 3, 2, 4, spatial_dims=spatial_dims), torch.Generator())
    block = block.double() if backend == "torch" else block
    layers = list(block.values())
    norms = [norm for layer in layers for norm in (layer.norm1, layer.norm2)]
    dtype = torch.float64 if backend == "torch" else torch.float32
    x = torch.randn(2, 3, *[5] * spatial_dims, dtype=dtype, requires_grad=True)
    return (
        x,
        list(block.layer_params()),
        [t for norm in norms for t in (norm.running_mean, norm.running_var)],
        [norm.eps for norm in norms],
        [0.0, 0.0],
        [False, False],
        4,
        training,
        not memory_efficient,
        dtype,
        backend,
        save,
        "",  # no SyncBatchNorm group
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep", "memeff"])
def test_operator_passes_opcheck(spatial_dims, training, memory_efficient):
    """PyTorch's own checks of a custom operator: schema, fake implementation against the real one
    (shapes, strides, dtypes of every output), autograd registration, and AOT dispatch."""
    args = block_op_args(spatial_dims, training, save=True, memory_efficient=memory_efficient)
    torch.library.opcheck(dense_block, args)


def test_operator_passes_opcheck_on_the_triton_backend():
    args = block_op_args(2, training=True, save=True, memory_efficient=False, backend="triton")
    torch.library.opcheck(dense_block, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_network_matches_torchvision(training):
    """Inductor, fullgraph=True (a graph break raises): outputs, every gradient, running statistics."""
    torch.manual_seed(0)
    ref = randomize_batchnorm(torchvision.models.DenseNet(**SMALL)).double()
    fast = fastdense.FastDenseNet(**SMALL, backend="torch").double()
    fast.load_state_dict(ref.state_dict())
    fast.compile(fullgraph=True)
    inputs = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    errors = compare(fast, ref, inputs, training)
    assert max(errors.values()) <= 1e-9, errors


def test_compiled_inference_without_autograd_matches_eager():
    torch.manual_seed(0)
    model = randomize_batchnorm(fastdense.FastDenseNet(**SMALL, backend="torch")).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_compiled_monai_3d_densenet_with_dropout_trains():
    """A converted MONAI 3-D DenseNet with channel-wise dropout compiles in one graph (the dropout
    draws inside the operator) and its training step gives finite gradients for every parameter."""
    from monai.networks.nets import DenseNet

    torch.manual_seed(0)
    model = DenseNet(3, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2, dropout_prob=0.2)
    model = fastdense.convert(model, strict=True, backend="torch")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(2, 1, 16, 16, 16)).square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_compiled_monai_3d_block_matches_monai():
    from monai.networks.nets import DenseNet

    torch.manual_seed(0)
    original = randomize_batchnorm(DenseNet(3, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2))
    original = original.double()
    converted = fastdense.convert(copy.deepcopy(original), strict=True, backend="torch")
    converted.compile(fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, out_ref = converted(x_fast), original(x_ref)
    assert relative_error(out_fast, out_ref) <= 1e-12
    weights = torch.randn_like(out_ref)
    (out_fast * weights).sum().backward(), (out_ref * weights).sum().backward()
    assert relative_error(x_fast.grad, x_ref.grad) <= 1e-10
    # All parameter gradients as one vector: norm0.bias's is zero up to rounding in both models here.
    grads = [torch.cat([p.grad.flatten() for p in model.parameters()]) for model in (converted, original)]
    assert relative_error(*grads) <= 1e-10
    for name, buffer in original.named_buffers():
        assert relative_error(converted.get_buffer(name), buffer) <= 1e-12, name


def test_compiled_triton_backend_block():
    """The triton backend's kernels inside the operator (the interpreter here, compiled kernels on a GPU)."""
    torch.manual_seed(0)
    ref = randomize_batchnorm(fastdense.FastDenseBlock(2, 3, 2, 4, backend="torch"), torch.Generator())
    fast = copy.deepcopy(ref)
    fast.backend = "triton"
    fast.compile(fullgraph=True, backend="aot_eager")
    errors = compare(fast, ref, [torch.randn(2, 3, 6, 5)], training=True)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_model_is_one_graph_around_the_block_operator(training):
    """Without fullgraph too: one graph, no break, and each dense block in it as fastdense's operator (the
    exported path, standard ATen operators, is for torch.export only). On torch 2.11 Dynamo answered
    ``torch.compiler.is_exporting()`` with True inside every compile, and could not trace the ContextVar
    and importlib calls a block's forward made: eval-mode blocks ran the exported path, and 27 breaks split
    a small network."""
    torch.manual_seed(0)
    model = fastdense.FastDenseNet(**SMALL, backend="torch").train(training)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(torch.randn(2, 3, 32, 32))
    assert len(graphs) == 1, [g.code for g in graphs]
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.fastdense.dense_block.default) == len(SMALL["block_config"]), targets
