"""MONAI DenseNets (2-D and 3-D) converted, and the 3-D block against MONAI's own (issue 6)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from monai.networks.nets import DenseNet, DenseNet121
from monai.networks.nets.densenet import _DenseBlock

import fastdense
from fastdense.densenet import Features
from fastdense.sequential_layer import SequentialDenseLayer
from fastdense.tools.verify import compare, randomize_batchnorm, relative_error

from .test_dtypes import check_precision

SMALL_3D = {"init_features": 8, "growth_rate": 4, "block_config": (2, 3), "bn_size": 2}


def monai_pair(spatial_dims: int, dtype=torch.float64, seed: int = 0, **kwargs):
    """A MONAI DenseNet with random weights and BatchNorm state, and a strictly converted deep copy."""
    torch.manual_seed(seed)
    config = {"spatial_dims": spatial_dims, "in_channels": 1, "out_channels": 3} | SMALL_3D | kwargs
    original = randomize_batchnorm(DenseNet(**config), torch.Generator().manual_seed(seed + 1)).to(dtype)
    return original, fastdense.convert(copy.deepcopy(original), strict=True, backend="torch")


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_monai_densenet_converts_exactly(spatial_dims, training):
    original, converted = monai_pair(spatial_dims)
    blocks = [m for m in converted.modules() if isinstance(m, fastdense.FastDenseBlock)]
    assert len(blocks) == 2 and all(b.spatial_dims == spatial_dims for b in blocks)
    assert type(converted.features) is Features and type(converted.features.transition1) is fastdense.Transition
    assert list(converted.state_dict()) == list(original.state_dict())
    inputs = [torch.randn(2, 1, *[14] * spatial_dims, dtype=torch.float64) for _ in range(2)]
    errors = compare(converted, original, inputs, training)
    assert max(errors.values()) <= 1e-9, errors


def test_monai_densenet121_3d_converts_and_checkpoints_load_both_ways():
    """The CT/MRI shape of use: MONAI's DenseNet121 on volumes, its checkpoint loading into the converted
    model and back. float64: at 32^3 the last block sees 1x1x1 maps, so its BatchNorms have only N values
    per channel, and so little data amplifies rounding far beyond float32's tolerance in either model."""
    torch.manual_seed(0)
    original = randomize_batchnorm(DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)).double()
    converted = fastdense.convert(copy.deepcopy(original), strict=True, backend="torch")
    assert sum(isinstance(m, fastdense.FastDenseBlock) for m in converted.modules()) == 4
    state = original.state_dict()
    converted.load_state_dict(state, strict=True)
    DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).load_state_dict(converted.state_dict(), strict=True)
    errors = compare(converted, original, [torch.randn(3, 1, 32, 32, 32, dtype=torch.float64)], training=True)
    assert max(errors.values()) <= 1e-9, errors


def _graph_nodes(output: torch.Tensor) -> list[str]:
    """The names of every node of ``output``'s autograd graph."""
    seen, todo, names = set(), [output.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [next_node for next_node, _ in node.next_functions]
    return names


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_monai_stem_and_transitions_keep_no_batchnorm_output(spatial_dims):
    """After conversion no BatchNorm of the network is an autograd node of PyTorch's (which keeps its
    input and, through the ReLU after it, its output): the stem's and the transitions' run inside
    fastdense's BN-ReLU-pool nodes, which recompute what they need, reading the block's statistics; only
    MONAI's norm5, before the head, stays. Both still match MONAI."""
    original, converted = monai_pair(spatial_dims)
    x = torch.randn(2, 1, *[14] * spatial_dims, dtype=torch.float64)
    errors = compare(converted, original, [x], training=True)
    assert max(errors.values()) <= 1e-9, errors
    fast_nodes, monai_nodes = _graph_nodes(converted.train()(x)), _graph_nodes(original.train()(x))
    # norm5; MONAI's also the stem's, the transitions' and the dense layers'
    assert fast_nodes.count("NativeBatchNormBackward0") == 1
    assert monai_nodes.count("NativeBatchNormBackward0") == 2 + 1 + 2 * 5
    assert fast_nodes.count("BatchNormReLUPoolBackward") == 2  # the stem's and the transition's


def test_a_monai_model_with_another_pool_keeps_its_modules_and_stays_exact():
    original, _ = monai_pair(3)
    original.features.transition1.pool = torch.nn.MaxPool3d(2)  # pooling first would not be exact
    converted = fastdense.convert(copy.deepcopy(original), strict=True, backend="torch")
    assert type(converted.features.transition1).__name__ == "_Transition"
    errors = compare(converted, original, [torch.randn(2, 1, 14, 14, 14, dtype=torch.float64)], training=True)
    assert max(errors.values()) <= 1e-9, errors


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_monai_2d_on_the_triton_backend_matches_monai(training):
    """A converted 2-D MONAI network on the triton backend (interpreter: blocks, stem and transitions by
    the kernels) in float32, within twice MONAI's own float32 error against its float64 run."""

    def make_pair(dtype, seed):
        original, _ = monai_pair(2, dtype, seed)
        return original, fastdense.convert(copy.deepcopy(original), strict=True, backend="triton")

    check_precision(make_pair, (4, 1, 12, 12), "float32", training, seeds=range(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_monai_3d_under_cpu_autocast_bf16_matches_monai(training):
    """Under the same bf16 autocast, within twice MONAI's own error against its float32 run."""
    make_pair = lambda dtype, seed: monai_pair(3, dtype, seed)  # noqa: E731
    check_precision(make_pair, (4, 1, 16, 16, 16), "autocast-bf16", training, seeds=range(4))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_block3d_matches_monai_block(training, memory_efficient):
    """``FastDenseBlock3d`` built directly (torchvision's names) against MONAI's block with its weights:
    output, input and parameter gradients, running statistics."""
    torch.manual_seed(0)
    ref = randomize_batchnorm(_DenseBlock(3, 3, 5, 2, 3, 0.0), torch.Generator().manual_seed(2)).double()
    fast = fastdense.FastDenseBlock3d(3, 5, 2, 3, memory_efficient=memory_efficient, backend="torch").double()
    fast.load_state_dict({key.replace(".layers.", "."): value for key, value in ref.state_dict().items()})
    ref.train(training), fast.train(training)
    for _ in range(2):
        x = torch.randn(2, 5, 4, 5, 6, dtype=torch.float64)
        x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_fast, out_ref = fast(x_fast), ref(x_ref)
        assert out_fast.is_contiguous(memory_format=torch.channels_last_3d)
        assert relative_error(out_fast, out_ref) <= 1e-12
        grad = torch.randn_like(out_ref)
        out_fast.backward(grad), out_ref.backward(grad)
        assert relative_error(x_fast.grad, x_ref.grad) <= 1e-10
    fast_state = dict(fast.named_parameters()) | dict(fast.named_buffers())
    for name, ref_tensor in [*ref.named_parameters(), *ref.named_buffers()]:
        fast_tensor = fast_state[name.replace(".layers.", ".")]
        if ref_tensor.is_floating_point():
            got, expected = (
                (fast_tensor.grad, ref_tensor.grad) if ref_tensor.requires_grad else (fast_tensor, ref_tensor)
            )
            assert relative_error(got, expected) <= 1e-10, name
        else:
            assert torch.equal(fast_tensor, ref_tensor), name


def test_block3d_on_the_triton_backend_matches_the_torch_backend():
    """1x1x1 conv and statistics by the kernels (rows of the buffer), 3x3x3 conv by PyTorch."""
    torch.manual_seed(0)
    ref = randomize_batchnorm(fastdense.FastDenseBlock3d(2, 4, 2, 3, backend="torch"), torch.Generator())
    fast = copy.deepcopy(ref)
    fast.backend = "triton"
    errors = compare(fast, ref, [torch.randn(2, 4, 3, 4, 5)], training=True)
    assert fast.active_backend == "triton"
    assert max(errors.values()) <= 1e-5, errors


def test_block3d_refuses_a_2d_input():
    block = fastdense.FastDenseBlock(2, 4, 2, 3, spatial_dims=3)
    with pytest.raises(ValueError, match=r"must be a 5-D \(N, C, D, H, W\) tensor \(spatial_dims=3\), got 4-D"):
        block(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 4"):
        fastdense.FastDenseBlock(2, 4, 2, 3, spatial_dims=4)


def dropout_masks(out, c0, growth, num_layers):
    return [out[:, c0 + i * growth : c0 + (i + 1) * growth].detach() != 0 for i in range(num_layers)]


def test_monai_dropout_is_channelwise_with_torchs_rate():
    """MONAI's layers drop with Dropout3d: whole channels of a sample, rate p, survivors scaled."""
    p, c0, growth = 0.4, 3, 4
    fast = fastdense.FastDenseBlock3d(1, c0, 2, growth, backend="torch").double()
    with torch.no_grad():
        x = torch.randn(64, c0, 3, 4, 4, dtype=torch.float64)
        undropped = fast(x)[:, c0:]
        fast.denselayer1.drop_rate, fast.denselayer1.channelwise_dropout = p, True
        dropped = fast(x)[:, c0:]
    kept = dropped != 0
    per_channel = kept.flatten(2)
    assert torch.equal(per_channel.all(2), per_channel.any(2))  # each (sample, channel) all kept or all zero
    rate, n = 1 - per_channel.all(2).double().mean().item(), per_channel.shape[0] * per_channel.shape[1]
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), rate
    torch.testing.assert_close(dropped[kept], undropped[kept] / (1 - p), rtol=1e-12, atol=0)


class ReplayDropout(torch.nn.Module):
    """Stands in for a MONAI layer's Dropout3d: applies a given mask (the one fastdense drew)."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_dropout_gradients_follow_the_forward_mask(spatial_dims):
    p, c0, growth, num_layers = 0.3, 8, 4, 2
    original, converted = monai_pair(spatial_dims, dropout_prob=p, block_config=(num_layers,))
    original.train(), converted.train()
    x = torch.randn(3, 1, *[12] * spatial_dims, dtype=torch.float64)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    block_out = {}
    converted.features.denseblock1.register_forward_hook(lambda m, i, o: block_out.setdefault("out", o))
    out_fast = converted(x_fast)
    masks = dropout_masks(block_out["out"], c0, growth, num_layers)
    assert all(0 < m.double().mean() < 1 for m in masks)
    for layer, mask in zip(original.features.denseblock1.children(), masks, strict=True):
        layer.layers.dropout = ReplayDropout(mask, p)
    out_ref = original(x_ref)
    assert relative_error(out_fast, out_ref) <= 1e-10
    grad = torch.randn_like(out_ref)
    out_fast.backward(grad)
    out_ref.backward(grad)
    assert relative_error(x_fast.grad, x_ref.grad) <= 1e-9
    # All parameter gradients as one vector: norm0.bias's is zero up to rounding in both models here.
    ref_grads = torch.cat([p.grad.flatten() for p in original.parameters()])
    assert relative_error(torch.cat([p.grad.flatten() for p in converted.parameters()]), ref_grads) <= 1e-9


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"act": "prelu"}, "activation other than ReLU"),
        ({"norm": "instance"}, "normalisation other than an affine BatchNorm3d"),
    ],
)
def test_monai_blocks_it_cannot_reproduce_stay_with_a_warning(kwargs, reason):
    model = DenseNet(spatial_dims=3, in_channels=1, out_channels=2, **(SMALL_3D | {"block_config": (2,)}), **kwargs)
    with pytest.warns(UserWarning, match=rf"features.denseblock1.*{reason}"):
        fastdense.convert(model)
    assert not any(isinstance(m, fastdense.FastDenseBlock) for m in model.modules())
    with pytest.raises(ValueError, match=rf"strict=True.*{reason}"):
        fastdense.convert(model, strict=True)


def test_monai_layer_standalone_behaves_like_monais():
    """A converted layer called on its own (outside the block) is MONAI's layer: cat([x, layers(x)])."""
    original, converted = monai_pair(3)
    layer = converted.features.denseblock1.denselayer1
    assert isinstance(layer, SequentialDenseLayer) and layer.layers is not None
    x = torch.randn(2, 8, 5, 5, 5, dtype=torch.float64)
    original.eval(), converted.eval()
    expected = original.features.denseblock1.denselayer1(x)
    assert relative_error(layer(x), expected) <= 1e-12
