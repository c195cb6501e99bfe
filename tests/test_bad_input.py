"""Bad input gets a clear exception naming what was expected; empty batches behave like torchvision."""

from __future__ import annotations

import pytest
import torch

from .helpers import TOLERANCE, assert_rel_close, assert_same_grads_and_buffers, block_pair
from .test_densenet import network_pair


@pytest.fixture
def block():
    return block_pair(2, 4, 2, 3)[1]


def test_wrong_channel_count_names_both_numbers(block):
    with pytest.raises(ValueError, match=r"input has 5 channels but the block expects 4 \(num_input_features\)"):
        block(torch.randn(2, 5, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(4, 3, 3), (1, 2, 4, 3, 3), (4,)])
def test_wrong_rank(block, shape):
    with pytest.raises(
        ValueError, match=rf"must be a 4-D \(N, C, H, W\) tensor \(spatial_dims=2\), got {len(shape)}-D"
    ):
        block(torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_dtype(block, dtype):
    with pytest.raises(TypeError, match=f"floating point dtype, got {dtype}"):
        block(torch.zeros(2, 4, 3, 3, dtype=dtype))


def test_mixed_dtypes_outside_autocast(block):
    message = r"input dtype torch.float32 does not match the parameters' dtype torch.float64"
    with pytest.raises(TypeError, match=message):
        block(torch.randn(2, 4, 3, 3, dtype=torch.float32))


def test_mixed_devices(block):
    with pytest.raises(ValueError, match="input is on meta but the block's parameters are on cpu"):
        block(torch.empty(2, 4, 3, 3, dtype=torch.float64, device="meta"))


def test_not_a_tensor(block):
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor, got list"):
        block([torch.randn(2, 4, 3, 3, dtype=torch.float64)])


def test_single_value_per_channel_in_training(block):
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training.*\(1, 4, 1, 1\)"):
        block.train()(x)
    block.eval()(x)  # fine in eval mode, as in torchvision


def test_network_single_value_per_channel_in_training():
    ref, fast = network_pair()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)  # the last block sees 1x1 features
    for model in (ref, fast):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            model.train()(x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_behaves_like_torchvision(training):
    ref, fast = block_pair(2, 4, 2, 3)
    ref.train(training)
    fast.train(training)
    x_fast = torch.randn(0, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x_fast.detach().clone().requires_grad_()
    out_fast, out_ref = fast(x_fast), ref(x_ref)
    assert out_fast.shape == out_ref.shape == (0, 10, 5, 5)
    out_fast.sum().backward()
    out_ref.sum().backward()
    assert x_fast.grad.shape == x_ref.grad.shape
    assert_same_grads_and_buffers(fast, ref, TOLERANCE[torch.float64])  # zero grads, stats untouched, counters +1


def test_nan_and_inf_propagate_like_torchvision():
    ref, fast = block_pair(2, 4, 2, 3)
    ref.eval()
    fast.eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    out_fast, out_ref = fast(x), ref(x)
    assert torch.equal(out_fast.isnan(), out_ref.isnan())
    assert torch.equal(out_fast.isinf(), out_ref.isinf())
    finite = out_ref.isfinite()
    assert_rel_close(out_fast[finite], out_ref[finite], TOLERANCE[torch.float64], "finite outputs")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_through_the_whole_network(training):
    ref, fast = network_pair()
    for model in (ref, fast):
        x = torch.randn(0, 3, 32, 32, dtype=torch.float64, requires_grad=True)
        out = model.train(training)(x)
        assert out.shape == (0, 5)
        out.sum().backward()
        assert x.grad.shape == x.shape
    assert_same_grads_and_buffers(fast, ref, TOLERANCE[torch.float64])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 3, 32, 32), (2, 3, 32)], ids=["unbatched", "5-D", "3-D"])
def test_network_wrong_rank_names_the_stem_and_the_layout(backend, shape):
    """torchvision's densenet121 refuses these in norm0 ("expected 4D input"); fastdense's stem says which
    part refused what, and how to batch a single image."""
    import fastdense

    model = fastdense.densenet121(backend=backend)
    message = rf"the stem \(conv0, norm0, pool0\): input must be a 4-D \(N, C, H, W\) tensor .*got {len(shape)}-D"
    for mode, grad in ((True, True), (False, True), (False, False)):  # eval without autograd: one buffer chain
        with pytest.raises(ValueError, match=message) as refused, torch.set_grad_enabled(grad):
            model.train(mode)(torch.randn(shape))
        assert ("unsqueeze(0)" in str(refused.value)) == (len(shape) == 3)


def test_transition_and_block_errors_name_their_part():
    import fastdense

    model = fastdense.densenet121()
    with pytest.raises(ValueError, match=r"a transition: input must be a 4-D \(N, C, H, W\) tensor"):
        model.features.transition1(torch.randn(256, 8, 8))
    with pytest.raises(ValueError, match=r"FastDenseBlock\(num_layers=24, num_input_features=256\): input has 3"):
        model.features.denseblock3(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"FastDenseBlock\(num_layers=16, .*more than 1 value per channel"):
        model.features.denseblock4(torch.randn(1, 512, 1, 1))


STEM = r"the stem \(conv0, norm0, pool0\): "


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (
            lambda: torch.randn(2, 1, 32, 32),
            ValueError,
            r"input has 1 channels but conv0 expects 3 \(its in_channels\)",
        ),
        (lambda: torch.randn(2, 3, 32, 32, dtype=torch.float64), TypeError, "input dtype torch.float64 does not match"),
        (
            lambda: torch.zeros(2, 3, 32, 32, dtype=torch.long),
            TypeError,
            "input must have a floating point dtype, got torch.int64",
        ),
        (lambda: torch.empty(2, 3, 32, 32, device="meta"), ValueError, "input is on meta but the model's parameters"),
    ],
    ids=["channels", "dtype", "integer", "device"],
)
def test_network_input_mistakes_are_named_at_the_stem(backend, x, error, message):
    """torchvision lets conv0 raise PyTorch's own errors (or a cross-device copy error); fastdense's stem
    names itself, the argument and what it expected, in training, eval and eval without autograd."""
    import fastdense

    model = fastdense.densenet121(num_classes=5, backend=backend)
    for mode, grad in ((True, True), (False, True), (False, False)):
        with pytest.raises(error, match=STEM + message), torch.set_grad_enabled(grad):
            model.train(mode)(x())


TRANSITION = r"a transition: "


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (lambda: torch.randn(256, 8, 8), ValueError, r"input must be a 4-D \(N, C, H, W\) tensor .*got 3-D"),
        (lambda: torch.randn(1, 2, 256, 8, 8), ValueError, r"input must be a 4-D \(N, C, H, W\) tensor .*got 5-D"),
        (lambda: torch.randn(2, 100, 8, 8), ValueError, r"input has 100 channels but its norm expects 256"),
        (lambda: torch.randn(2, 256, 8, 8, dtype=torch.float64), TypeError, "input dtype torch.float64 does not"),
        (lambda: torch.zeros(2, 256, 8, 8, dtype=torch.long), TypeError, "input must have a floating point dtype, got"),
        (lambda: torch.empty(2, 256, 8, 8, device="meta"), ValueError, "input is on meta but the transition's"),
        (lambda: [torch.randn(2, 256, 8, 8)], TypeError, r"input must be a torch\.Tensor, got list"),
        (lambda: torch.randn(2, 256, 1, 5), ValueError, r"input of spatial size \(1, 5\) is smaller than its pool"),
    ],
    ids=["unbatched", "5-D", "channels", "dtype", "integer", "device", "list", "too-small"],
)
def test_transition_input_mistakes_are_named(backend, x, error, message):
    """torchvision's transition lets BatchNorm, the conv or the pool raise PyTorch's own errors (the Triton
    kernels would see the input first); fastdense's names the transition and what it expected, in
    training, eval and eval without autograd (where the triton backend runs one fused kernel)."""
    import fastdense

    transition = fastdense.densenet121(backend=backend).features.transition1
    for mode, grad in ((True, True), (False, True), (False, False)):
        with pytest.raises(error, match=TRANSITION + message), torch.set_grad_enabled(grad):
            transition.train(mode)(x())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_converted_timm_transition_names_its_mistakes_too(backend):
    import fastdense

    from .test_frameworks import timm_pair

    transition = timm_pair()[1].features.transition1  # timm's norm is a BatchNormAct2d: the ReLU inside
    assert type(transition) is fastdense.Transition and transition.exact()
    transition.backend = backend
    for mode in (True, False):
        with pytest.raises(ValueError, match=TRANSITION + "input has 3 channels but its norm expects 16"):
            transition.train(mode)(torch.randn(2, 3, 4, 4, dtype=torch.float64))
