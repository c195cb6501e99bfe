"""The FLOP counters and model summaries people use, on fastdense models against the same tool on the original
library's model (issue 33): ptflops (both backends), thop, torchinfo, fvcore and PyTorch's FlopCounterMode,
densenet121 built and converted and a converted MONAI 3-D DenseNet; hooks on a block's inner modules fire
with the original's tensors; a user's dispatch mode sees the ATen operators; patched functions are seen.

The tools are test dependencies (requirements.txt); where one does not install, its tests skip, saying so.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import fastdense
from fastdense.tools.verify import randomize_batchnorm

from .helpers import TOLERANCE

IMAGE = (3, 64, 64)  # small, to keep the counts quick; every tool scales with the pixels alike
VOLUME = (1, 32, 32, 32)


def _tool(name: str):
    return pytest.importorskip(name, reason=f"{name} does not install here")


def ptflops_pytorch(model, shape):
    macs, params = _tool("ptflops").get_model_complexity_info(
        model, shape, as_strings=False, print_per_layer_stat=False, verbose=False, backend="pytorch"
    )
    return macs, params


def ptflops_aten(model, shape):
    macs, params = _tool("ptflops").get_model_complexity_info(
        model, shape, as_strings=False, print_per_layer_stat=False, verbose=False, backend="aten"
    )
    return macs, params


def thop(model, shape):
    # thop registers count buffers on every module it hooks: a copy keeps the model's state_dict clean.
    macs, params = _tool("thop").profile(copy.deepcopy(model), inputs=(torch.randn(1, *shape),), verbose=False)
    return macs, params


def torchinfo(model, shape):
    summary = _tool("torchinfo").summary(model, input_size=(1, *shape), verbose=0)
    return summary.total_mult_adds, summary.total_params


def fvcore(model, shape):
    analysis = _tool("fvcore.nn").FlopCountAnalysis(model, torch.randn(1, *shape))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total(), sum(p.numel() for p in model.parameters())


def flop_counter_mode(model, shape):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *shape))
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters())


TOOLS = [ptflops_pytorch, ptflops_aten, thop, torchinfo, fvcore, flop_counter_mode]


def _densenet121(kind: str):
    torch.manual_seed(0)
    original = randomize_batchnorm(torchvision.models.densenet121()).eval()
    if kind == "built":
        fast = fastdense.densenet121(backend="torch")
        fast.load_state_dict(original.state_dict())
        return original, fast.eval(), IMAGE
    return original, fastdense.convert(copy.deepcopy(original), backend="torch"), IMAGE


def _monai_3d(kind: str):
    monai = pytest.importorskip("monai", reason="monai does not install here")
    torch.manual_seed(0)
    original = monai.networks.nets.DenseNet(
        spatial_dims=3, in_channels=1, out_channels=2, init_features=16, growth_rate=8, block_config=(2, 3, 2)
    )
    original = randomize_batchnorm(original).eval()
    return original, fastdense.convert(copy.deepcopy(original), backend="torch"), VOLUME


MODELS = {
    "densenet121-built": lambda: _densenet121("built"),
    "densenet121-converted": lambda: _densenet121("converted"),
    "monai-3d-converted": lambda: _monai_3d("converted"),
}


@pytest.mark.parametrize("tool", TOOLS, ids=[t.__name__ for t in TOOLS])
@pytest.mark.parametrize("model", list(MODELS))
def test_each_tool_counts_what_it_counts_for_the_original(tool, model):
    """Within [0.88, 1.10] of the tool's own MACs for the original model, and the same parameter count."""
    original, fast, shape = MODELS[model]()
    with torch.no_grad():
        macs, params = tool(fast, shape)
        ref_macs, ref_params = tool(original, shape)
    assert ref_macs > 0
    assert 0.88 <= macs / ref_macs <= 1.10, (macs, ref_macs)
    assert params == ref_params


def test_torchinfo_lists_the_layers_inside_a_block():
    torchinfo_module = _tool("torchinfo")
    original, fast, shape = _densenet121("built")
    rows = {}
    for name, model in (("original", original), ("fast", fast)):
        summary = torchinfo_module.summary(model, input_size=(1, *shape), verbose=0)
        rows[name] = [(layer.class_name, layer.depth) for layer in summary.summary_list]
    # The same tree, row for row: containers are fastdense's classes, the leaves torchvision's modules.
    assert [depth for _, depth in rows["fast"]] == [depth for _, depth in rows["original"]]
    leaves = {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "AvgPool2d", "Linear"}
    assert [c for c, _ in rows["fast"] if c in leaves] == [c for c, _ in rows["original"] if c in leaves]
    assert sum(c == "Conv2d" for c, _ in rows["fast"]) == 120  # densenet121: conv0, 2 per layer, 3 transitions


def _recorder(store: dict, name: str):
    def hook(module, args, output):
        store[name] = ([a.detach().clone() for a in args[0]] if isinstance(args[0], list) else args[0].detach().clone(),
                       output.detach().clone())  # fmt: skip

    return hook


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("where", ["denselayer2", "denselayer2.conv2", "denselayer1.norm1"])
def test_a_hook_inside_a_block_fires_with_the_original_tensors(backend, training, where):
    """torchvision's block passes each layer the list of earlier maps; its layer's modules get the
    concatenation and the bottleneck. The fast block, hooked, runs its layers as modules the same way; the
    hook's removal brings the fused block back."""
    from .test_densenet import network_pair

    dtype = torch.float64 if backend == "torch" else torch.float32  # the kernels take no float64
    ref, fast = network_pair(dtype, backend=backend)
    ref.train(training), fast.train(training)
    close = {"rtol": TOLERANCE[dtype], "atol": TOLERANCE[dtype]}
    seen: dict = {}
    handles = [
        model.features.denseblock2.get_submodule(where).register_forward_hook(_recorder(seen, name))
        for name, model in (("ref", ref), ("fast", fast))
    ]
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    out, expected = fast(x), ref(x)
    torch.testing.assert_close(out, expected, **close)
    (ref_in, ref_out), (fast_in, fast_out) = seen["ref"], seen["fast"]
    if isinstance(ref_in, list):  # a layer: the list of the earlier feature maps
        assert len(fast_in) == len(ref_in)
        for a, b in zip(fast_in, ref_in, strict=True):
            torch.testing.assert_close(a, b, **close)
    else:
        torch.testing.assert_close(fast_in, ref_in, **close)
    torch.testing.assert_close(fast_out, ref_out, **close)
    for handle in handles:
        handle.remove()
    seen.clear()
    calls = []
    original_run = fastdense.block.run_dense_block
    fastdense.block.run_dense_block = lambda *a, **k: calls.append(1) or original_run(*a, **k)
    try:
        fast(x)
    finally:
        fastdense.block.run_dense_block = original_run
    assert not seen and calls, "the fused block runs again once the hook is removed"


def test_a_backward_hook_and_a_global_hook_fire_too():
    from .test_densenet import network_pair

    ref, fast = network_pair(torch.float64)
    grads = {}
    for name, model in (("ref", ref), ("fast", fast)):
        conv = model.features.denseblock1.denselayer2.conv1
        conv.register_full_backward_hook(lambda m, gin, gout, name=name: grads.__setitem__(name, gout[0].clone()))
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()
    assert grads["fast"].shape == grads["ref"].shape
    names = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: names.append(type(m).__name__))
    try:
        fast(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    finally:
        handle.remove()
    assert names.count("Conv2d") == sum(isinstance(m, torch.nn.Conv2d) for m in fast.modules())


class _OperatorLog(TorchDispatchMode):
    """A user's dispatch mode: records the ATen operators it sees."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_users_dispatch_mode_sees_the_aten_operators(training):
    """No opaque fastdense operator; as many convolutions as torchvision's model runs, forward and backward."""
    from .test_densenet import network_pair

    ref, fast = network_pair(torch.float64)
    logs = {}
    for name, model in (("ref", ref), ("fast", fast)):
        model.train(training)
        with _OperatorLog() as log:
            out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
            if training:
                out.sum().backward()
        logs[name] = log.ops
    assert not [op for op in logs["fast"] if op.startswith("fastdense.")]
    for op in ("aten.convolution", "aten.convolution_backward"):
        assert logs["fast"].count(op) == logs["ref"].count(op), op


def test_functions_patched_after_import_are_the_ones_called(monkeypatch):
    """A tool that replaces ``torch.nn.functional.conv2d`` (ptflops does) sees the fused torch backend call it."""
    from .test_densenet import network_pair

    _, fast = network_pair(torch.float64, backend="torch")
    calls = []
    original = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    layers = sum(len(block) for block in fast.dense_blocks())
    assert len(calls) >= layers  # each layer's 3x3 convolution at least


def test_a_pre_hook_inside_a_block_sees_the_original_input():
    from .test_densenet import network_pair

    ref, fast = network_pair(torch.float64)
    seen = {}
    for name, model in (("ref", ref), ("fast", fast)):
        conv = model.features.denseblock1.denselayer2.conv1
        conv.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].clone()))
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(seen["fast"], seen["ref"], rtol=1e-9, atol=1e-9)


def test_a_hook_inside_a_converted_monai_block_sees_monais_tensors():
    """MONAI's block passes each layer the running concatenation and gets it back with the new maps."""
    original, fast, shape = _monai_3d("converted")
    original, fast = original.double(), fast.double()
    seen = {}
    for name, model in (("monai", original), ("fast", fast)):
        for where in ("denselayer2", "denselayer2.layers.conv2"):
            module = model.features.denseblock1.get_submodule(where)
            module.register_forward_hook(lambda m, args, out, key=(name, where): seen.__setitem__(key, (args[0], out)))
    x = torch.randn(2, *shape, dtype=torch.float64)
    torch.testing.assert_close(fast(x), original(x), rtol=1e-9, atol=1e-9)
    for where in ("denselayer2", "denselayer2.layers.conv2"):
        for a, b in zip(seen[("fast", where)], seen[("monai", where)], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
