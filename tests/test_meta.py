"""Models built and run on the ``meta`` device (no data: shapes only), as timm's default-configuration test
does and as users do before ``to_empty``: forward and backward give the shapes, dtypes and strides (the
memory layout) of the same run on real tensors, for built and converted models, 2-D and 3-D."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fastdense

from .test_densenet import SMALL


def _step(build, shape, device, training):
    with torch.device(device):
        torch.manual_seed(0)
        model = build().train(training)
        x = torch.randn(shape).requires_grad_()
    out = model(x)
    out.sum().backward()
    return [out, x.grad, *(p.grad for p in model.parameters()), *model.buffers()]


def _layout(t):
    """Shape, dtype and the strides of the dimensions that have any (a size-1 dimension's stride is
    arbitrary: PyTorch's CPU convolution and its meta function choose differently there)."""
    return t.shape, t.dtype, tuple(stride for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1)


BUILDS = {
    "fastdense": (lambda: fastdense.FastDenseNet(**SMALL), (2, 3, 32, 32)),
    "converted-torchvision": (lambda: fastdense.convert(torchvision.models.DenseNet(**SMALL)), (2, 3, 32, 32)),
    "fastdense-memory-efficient": (lambda: fastdense.FastDenseNet(**SMALL, memory_efficient=True), (2, 3, 32, 32)),
}


def _monai(spatial_dims):
    from monai.networks.nets import DenseNet

    return lambda: fastdense.convert(DenseNet(spatial_dims, 1, 3, init_features=8, growth_rate=4, block_config=(2, 3)))


def _timm():
    import timm

    return fastdense.convert(timm.create_model("densenet121", num_classes=5))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("what", [*BUILDS, "converted-timm", "converted-monai-2d", "converted-monai-3d"])
def test_a_meta_step_has_the_layout_of_a_real_one(what, training):
    build, shape = {
        **BUILDS,
        "converted-timm": (_timm, (2, 3, 64, 64)),
        "converted-monai-2d": (_monai(2), (2, 1, 32, 32)),
        "converted-monai-3d": (_monai(3), (2, 1, 16, 16, 16)),
    }[what]
    real, meta = _step(build, shape, "cpu", training), _step(build, shape, "meta", training)
    assert any(isinstance(m, fastdense.FastDenseBlock) for m in build().modules())  # it did convert
    assert all(t.device.type == "meta" for t in meta)
    assert [_layout(t) for t in meta] == [_layout(t) for t in real]
