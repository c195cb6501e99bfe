"""Leaving eager PyTorch (issue 16): ``fastdense.revert``, FX and torchvision's feature extraction,
TorchScript, torch.export down to core ATen, and ONNX through onnxruntime, each against torchvision's
(or timm's, or MONAI's) own model on fresh random weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torchvision.models.densenet import DenseNet, _DenseBlock, _Transition
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fastdense
from fastdense.tools.verify import compare, relative_error

from .test_densenet import network_pair
from .test_frameworks import timm_pair
from .test_monai import monai_pair

NODES = {"features.denseblock2": "c3", "features.transition2": "t2", "features.norm5": "head"}


def x64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def state_objects(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict(keep_vars=True)


def assert_same_objects(model: torch.nn.Module, objects: dict[str, torch.Tensor]) -> None:
    now = state_objects(model)
    assert list(now) == list(objects)
    assert all(now[key] is value for key, value in objects.items()), "a parameter or buffer was replaced"


# --- revert ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_revert_of_a_converted_torchvision_model_gives_its_blocks_back(training):
    ref, _ = network_pair()
    converted = fastdense.convert(copy.deepcopy(ref), backend="torch")
    originals = {name: m for name, m in converted.named_modules() if isinstance(m, fastdense.FastDenseBlock)}
    objects = state_objects(converted)
    reverted = fastdense.revert(converted)
    assert reverted is converted
    assert not any(isinstance(m, fastdense.FastDenseBlock) for m in reverted.modules())
    assert all(type(reverted.get_submodule(name)) is _DenseBlock for name in originals)
    assert type(reverted.features) is torch.nn.Sequential  # convert swapped it and the transitions too
    assert all(type(m) is type(ref.features.transition1) for n, m in reverted.features.named_children() if "trans" in n)
    assert_same_objects(reverted, objects)
    errors = compare(reverted, ref, [x64(2, 3, 32, 32, seed=s) for s in range(2)], training)
    assert max(errors.values()) <= 1e-12, errors  # the very same code as torchvision's now


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_revert_of_a_fastdense_network_is_torchvisions_densenet(training):
    ref, fast = network_pair()
    objects = state_objects(fast)
    reverted = fastdense.revert(fast)
    assert type(reverted) is DenseNet and type(reverted.features.transition1) is _Transition
    assert not any(t.is_meta for t in reverted.state_dict().values())
    assert_same_objects(reverted, objects)
    errors = compare(reverted, ref, [x64(2, 3, 32, 32, seed=s) for s in range(2)], training)
    assert max(errors.values()) <= 1e-12, errors
    assert type(fast.features.denseblock1) is fastdense.FastDenseBlock  # the fastdense model is left as it was


def test_reverted_blocks_follow_modules_replaced_after_conversion():
    """convert, then SyncBatchNorm.convert_sync_batchnorm (new norm modules), then revert: the original
    layers hold the new modules, not the ones convert saw."""
    ref, _ = network_pair(dtype=torch.float32)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fastdense.convert(copy.deepcopy(ref)))
    norm = converted.features.denseblock1.denselayer1.norm1
    reverted = fastdense.revert(converted)
    assert reverted.features.denseblock1.denselayer1.norm1 is norm


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_revert_round_trips_a_timm_model(training):
    original, converted = timm_pair()
    objects = state_objects(converted)
    reverted = fastdense.revert(converted)
    blocks = [m for m in reverted.modules() if type(m).__name__ == "DenseBlock"]
    assert len(blocks) == 2 and all(type(m).__module__.startswith("timm.") for m in blocks)
    assert type(reverted.features) is torch.nn.Sequential
    assert type(reverted.features.transition1).__module__.startswith("timm.")
    assert_same_objects(reverted, objects)
    errors = compare(reverted, original, [x64(2, 3, 32, 32)], training)
    assert max(errors.values()) <= 1e-12, errors


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_revert_round_trips_a_monai_model(spatial_dims):
    original, converted = monai_pair(spatial_dims, dropout_prob=0.0)
    objects = state_objects(converted)
    reverted = fastdense.revert(converted)
    blocks = [m for m in reverted.modules() if type(m).__name__ == "_DenseBlock"]
    assert len(blocks) == 2 and all(type(m).__module__.startswith("monai.") for m in blocks)
    assert type(reverted.features) is torch.nn.Sequential  # the stem and transitions are MONAI's again
    assert type(reverted.features.transition1).__module__.startswith("monai.")
    assert_same_objects(reverted, objects)
    errors = compare(reverted, original, [x64(2, 1, *[12] * spatial_dims)], training=True)
    assert max(errors.values()) <= 1e-12, errors


def test_revert_of_a_single_block_and_of_a_block_built_by_fastdense():
    block = fastdense.FastDenseBlock(3, 8, 2, 4, drop_rate=0.25, memory_efficient=True).double()
    objects = state_objects(block)
    reverted = fastdense.revert(block)
    assert type(reverted) is _DenseBlock and reverted.denselayer2.drop_rate == 0.25
    assert reverted.denselayer1.memory_efficient
    assert_same_objects(reverted, objects)
    x = x64(2, 8, 9, 9)
    block.eval(), reverted.eval()
    assert relative_error(reverted(x), block(x)) <= 1e-12


# --- FX and torchvision's feature extraction ----------------------------------------------------------


def test_symbolic_trace_records_blocks_and_transitions_as_modules():
    ref, fast = network_pair()
    graph = torch.fx.symbolic_trace(fast.eval())
    called = [node.target for node in graph.graph.nodes if node.op == "call_module"]
    for name in ("features.denseblock1", "features.transition1", "features.denseblock3", "classifier"):
        assert name in called
    x = x64(2, 3, 32, 32)
    assert relative_error(graph(x), ref.eval()(x)) <= 1e-12


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("how", ["fastdense", "converted"])
def test_feature_extraction_gives_torchvisions_node_names_and_tensors(how, training):
    ref, fast = network_pair()
    model = fast if how == "fastdense" else fastdense.convert(copy.deepcopy(ref), backend="torch")
    for nodes in get_graph_node_names(model):  # train, eval; a module's name selects its last node
        assert all(any(n == key or n.startswith(f"{key}.") for n in nodes) for key in NODES), nodes
    if how == "fastdense":  # blocks and transitions are single nodes, named like the modules
        assert {"features.denseblock2", "features.transition2"} <= set(get_graph_node_names(model)[1])
    extractor = create_feature_extractor(model, return_nodes=NODES).train(training)
    reference = create_feature_extractor(ref, return_nodes=NODES).train(training)
    x = x64(2, 3, 32, 32)
    got, expected = extractor(x), reference(x)
    assert list(got) == list(expected) == list(NODES.values())
    for key in got:
        assert relative_error(got[key], expected[key]) <= 1e-9, key
    got["head"].sum().backward()  # differentiable through the recorded blocks
    assert model.features.conv0.weight.grad is not None


# --- TorchScript ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet_torchscript_deprecation():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
        yield


def _module_types(model):
    return [(name, type(module)) for name, module in model.named_modules()]


def _saved_and_loaded(scripted, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(scripted, path)
    return torch.jit.load(path)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("what", ["network", "converted", "block", "transition", "features"])
def test_torchscript_compiles_every_fastdense_module_and_leaves_it_as_it_is(what, how, tmp_path):
    """torch.jit.script and torch.jit.trace of a fastdense network, a converted torchvision model and each
    fastdense module on its own compile the original computation on the same parameters: outputs equal
    eager in float64; the scripted module saves and loads; the eager model keeps its modules."""
    ref, fast = network_pair()
    converted = fastdense.convert(copy.deepcopy(ref))
    x = x64(2, 3, 32, 32)
    module, inputs, expected = {
        "network": (fast, x, ref),
        "converted": (converted, x, ref),
        "block": (fast.features.denseblock1, x64(2, 8, 8, 8), ref.features.denseblock1),
        "transition": (fast.features.transition1, x64(2, 16, 8, 8), ref.features.transition1),
        "features": (fast.features, x, ref.features),
    }[what]
    module.eval(), expected.eval()
    types, objects = _module_types(module), state_objects(module)
    compiled = torch.jit.script(module) if how == "script" else torch.jit.trace(module, (inputs,))
    assert _module_types(module) == types
    assert_same_objects(module, objects)
    want = expected(inputs)
    assert relative_error(compiled(inputs), want) <= 1e-12
    assert relative_error(module(inputs), want) <= 1e-12  # the eager module still runs fastdense's path
    assert relative_error(_saved_and_loaded(compiled, tmp_path)(inputs), want) <= 1e-12


def test_a_scripted_model_trains_the_shared_parameters():
    """Scripting shares the parameters (no copies): a training step of the scripted model updates the eager
    model's, exactly as the same step of torchvision's model updates its own."""
    ref, fast = network_pair()
    scripted = torch.jit.script(fast.train())
    x, target = x64(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for model in (scripted, ref.train()):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    for (name, param), ref_param in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert relative_error(param, ref_param) <= 1e-12, name
    for (name, buffer), ref_buffer in zip(fast.named_buffers(), ref.buffers(), strict=True):
        assert relative_error(buffer.double(), ref_buffer.double()) <= 1e-12, name


@pytest.mark.parametrize("library", ["timm", "monai-2d", "monai-3d"])
def test_converted_timm_and_monai_models_script_directly(library, tmp_path):
    if library == "timm":
        original, converted = timm_pair()
        x = x64(2, 3, 32, 32)
    else:
        spatial_dims = int(library[-2])
        original, converted = monai_pair(spatial_dims, dropout_prob=0.0)
        x = x64(2, 1, *[12] * spatial_dims)
    original.eval(), converted.eval()
    scripted = torch.jit.script(converted)
    assert any(isinstance(m, fastdense.FastDenseBlock) for m in converted.modules())  # still converted
    assert relative_error(scripted(x), original(x)) <= 1e-12
    assert relative_error(_saved_and_loaded(scripted, tmp_path)(x), original(x)) <= 1e-12


def test_a_converted_monai_model_reaches_torchscript_through_revert_too():
    original, converted = monai_pair(3, dropout_prob=0.0)
    scripted = torch.jit.script(fastdense.revert(converted).eval())
    x = x64(2, 1, 12, 12, 12)
    assert relative_error(scripted(x), original.eval()(x)) <= 1e-12


# --- torch.export and ONNX ----------------------------------------------------------------------------


def test_torch_export_of_an_eval_model_lowers_to_core_aten():
    ref, fast = network_pair(dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(fast.eval(), (x,)).run_decompositions()
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("fastdense" in target for target in targets), targets
    assert all(t.startswith(("aten.", "<built-in")) for t in targets), targets
    assert relative_error(program.module()(x), ref.eval()(x)) <= 1e-5


def test_onnx_export_runs_in_onnxruntime_like_eager():
    import onnxruntime  # pinned in requirements.txt, with onnx and onnxscript

    ref, fast = network_pair(dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32)
    program = torch.onnx.export(fast.eval(), (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    expected = ref.eval()(x).detach()
    assert relative_error(torch.from_numpy(out), expected) <= 1e-4


def test_the_legacy_onnx_exporter_traces_the_original_computation(tmp_path):
    """``torch.onnx.export(..., dynamo=False)`` is built on torch.jit.trace, which records the original
    computation: the file runs in onnxruntime like eager."""
    import onnxruntime

    ref, fast = network_pair(dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fast.eval(), (x,), str(path), dynamo=False)
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert relative_error(torch.from_numpy(out), ref.eval()(x).detach()) <= 1e-4
