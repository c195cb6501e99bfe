"""The peers' own model tests, in our words: what torchvision, timm and MONAI check of their DenseNets,
checked of fastdense's models and of ``fastdense.convert`` of theirs.

* torchvision (``test/test_models.py``, ``test/test_backbone_utils.py``, the extended weights-metadata
  test): output shape, TorchScript (scripted, saved and loaded, against eager), FX, input backprop,
  ``memory_efficient``; feature extractors (node names, forward/backward, scripted forward/backward,
  against ``IntermediateLayerGetter``); ``num_params`` and ``_ops`` of the weights' metadata.
* timm (``tests/test_models.py``): forward, backward (every parameter gets a gradient), the default
  configuration's shapes on the ``meta`` device, TorchScript, ``features_only``, ``forward_intermediates``
  and FX feature extraction.
* MONAI (``tests/networks/nets/test_densenet.py``): every shape case (1-D, 2-D with PReLU, 3-D with
  instance norm; DenseNet121/169/201/264) and every TorchScript save case.

FLOP counts (``torch.utils.flop_counter.FlopCounterMode``) are checked in ``tests/test_flops.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torchvision.models import densenet as tv_densenet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fastdense

MODELS = ["densenet121", "densenet161", "densenet169", "densenet201"]
SOURCES = ["fastdense", "converted"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
        warnings.filterwarnings("ignore", "fastdense.convert", UserWarning)
        yield


def model_of(source: str, name: str, **kwargs) -> torch.nn.Module:
    """A fresh model: fastdense's constructor, or fastdense.convert of torchvision's (same seed)."""
    torch.manual_seed(0)
    if source == "fastdense":
        return getattr(fastdense, name)(**kwargs)
    return fastdense.convert(getattr(torchvision.models, name)(**kwargs))


def _scripted_round_trip(model, x, tmp_path):
    scripted = torch.jit.script(model)
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    return scripted(x), torch.jit.load(str(path))(x)


# --- torchvision: test_models.py --------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_classification_model_checks(name, source, tmp_path):
    model = model_of(source, name, num_classes=50).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 50)
    # scriptable: eager and scripted agree, and so does the scripted model saved and loaded
    with torch.no_grad():
        scripted_out, loaded_out = _scripted_round_trip(model, x, tmp_path)
    torch.testing.assert_close(scripted_out, out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded_out, out, rtol=1e-4, atol=1e-4)
    # FX
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), out, rtol=1e-4, atol=1e-4)
    # input backprop
    inp = x.detach().requires_grad_(True)
    model(inp).mean().backward()
    assert inp.grad is not None and torch.isfinite(inp.grad).all()
    assert any(isinstance(m, fastdense.FastDenseBlock) for m in model.modules())  # scripting changed nothing


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_memory_efficient_densenet_check(name, source):
    """Same weights with and without memory_efficient give the same outputs; both train."""
    x = torch.rand(1, 3, 64, 64)
    model1 = model_of(source, name, num_classes=50, memory_efficient=True)
    params = model1.state_dict()
    num_params = sum(p.numel() for p in model1.parameters())
    model1.eval()
    out1 = model1(x)
    out1.sum().backward()
    num_grad = sum(p.grad.numel() for p in model1.parameters() if p.grad is not None)
    model2 = model_of(source, name, num_classes=50, memory_efficient=False)
    model2.load_state_dict(params)
    model2.eval()
    out2 = model2(x)
    assert num_params == num_grad
    torch.testing.assert_close(out1, out2, rtol=0.0, atol=1e-5)


# --- torchvision: test_backbone_utils.py ------------------------------------------------------------

RETURN_NODES = {"features.denseblock1": "c2", "features.denseblock3": "c4", "features.norm5": "head"}


@pytest.mark.parametrize("source", SOURCES)
def test_torchvision_backbone_checks(source):
    model = model_of(source, "densenet121")
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes == eval_nodes and set(RETURN_NODES) <= set(train_nodes)
    # each block is one node named like its module (torchvision's blocks are traced through instead)
    assert {f"features.denseblock{i}" for i in range(1, 5)} <= set(train_nodes)
    x = torch.rand(2, 3, 64, 64)
    # forward/backward of the extractor, in training mode
    extractor = create_feature_extractor(model, RETURN_NODES).train()
    out = extractor(x)
    assert list(out) == list(RETURN_NODES.values())
    sum(o.float().mean() for o in out.values()).backward()
    assert all(p.grad is not None for p in extractor.features.denseblock1.parameters())
    # the same maps as torchvision's IntermediateLayerGetter over `features`, in eval mode
    extractor.eval()
    getter = IntermediateLayerGetter(model.features, {name.split(".")[1]: key for name, key in RETURN_NODES.items()})
    with torch.no_grad():
        fx_out, getter_out = extractor(x), getter.eval()(x)
    for key in fx_out:
        torch.testing.assert_close(fx_out[key], getter_out[key], rtol=1e-5, atol=1e-6)
    # scripted extractor: forward and backward
    scripted = torch.jit.script(create_feature_extractor(model, RETURN_NODES).train())
    scripted_out = scripted(x)
    sum(o.mean() for o in scripted_out.values()).backward()
    scripted.eval()  # its training step moved the shared running statistics: compare after it
    with torch.no_grad():
        want = extractor.eval()(x)  # (the second extractor put the shared modules in training mode)
        for key, value in scripted(x).items():  # float32: the fused and the reference paths round apart
            torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5)


# --- torchvision: test_extended_models.py (weights metadata) ----------------------------------------


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_weights_metadata_num_params(name, source):
    weights = tv_densenet.__dict__[f"DenseNet{name[8:]}_Weights"].DEFAULT
    with torch.device("meta"):  # no memory for the weights; the count is the same
        model = model_of(source, name)
    assert sum(p.numel() for p in model.parameters()) == weights.meta["num_params"]


# --- timm: tests/test_models.py ---------------------------------------------------------------------

TIMM_MODELS = ["densenet121", "densenetblur121d"]


def timm_converted(name: str, **kwargs):
    import timm

    torch.manual_seed(0)
    model = fastdense.convert(timm.create_model(name, pretrained=False, **kwargs))
    assert any(isinstance(m, fastdense.FastDenseBlock) for m in model.modules())
    return model


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_forward_and_backward(name):
    model = timm_converted(name).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 224, 224))
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()
    model = timm_converted(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    outputs = model(torch.randn(2, 3, 128, 128))
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert num_params == sum(p.grad.numel() for p in model.parameters())
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_default_cfgs_on_meta(name):
    """timm's default-configuration test, on the meta device (no data, shapes only)."""
    with torch.device("meta"):
        model = timm_converted(name).eval()
        state_dict = model.state_dict()
        cfg = model.default_cfg
        x = torch.randn(1, *cfg["input_size"])
        outputs = model.forward_features(x)
        assert outputs.shape[-2:] == cfg["pool_size"] and outputs.device.type == "meta"
        model.reset_classifier(0)
        outputs = model(x)
        assert outputs.shape == (1, model.num_features)
        model.reset_classifier(0, "")
        outputs = model(x)
        assert outputs.dim() == 4 and outputs.shape[-2:] == cfg["pool_size"]
    for key in (cfg["classifier"], cfg["first_conv"]):
        assert f"{key}.weight" in state_dict


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_forward_torchscript(name):
    import timm

    with timm.set_scriptable(True):
        model = timm_converted(name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        outputs = scripted(x)
        torch.testing.assert_close(outputs, model(x), rtol=1e-4, atol=1e-4)
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_features_only_intermediates_and_fx(name):
    import timm
    from timm.models import create_feature_extractor as timm_feature_extractor
    from timm.models import get_graph_node_names as timm_node_names

    model = timm_converted(name, features_only=True).eval()
    expected_channels = model.feature_info.channels()
    assert len(expected_channels) >= 4
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 96, 96))
    assert [o.shape[1] for o in outputs] == expected_channels
    assert all(o.shape[0] == 1 and not torch.isnan(o).any() for o in outputs)
    # forward_intermediates: the converted model's against timm's own
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False).eval()
    converted = fastdense.convert(copy.deepcopy(original))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        final, intermediates = converted.forward_intermediates(x)
        want_final, want_intermediates = original.forward_intermediates(x)
    torch.testing.assert_close(final, want_final, rtol=1e-4, atol=1e-5)
    for got, want in zip(intermediates, want_intermediates, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # timm's FX feature extraction up to the last node
    _, eval_nodes = timm_node_names(converted)
    extractor = timm_feature_extractor(converted, return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        (out,) = extractor(x).values()
    torch.testing.assert_close(out, original(x), rtol=1e-4, atol=1e-5)


# --- MONAI: tests/networks/nets/test_densenet.py ----------------------------------------------------

MONAI_CASES = [  # MONAI's own: (constructor arguments, input shape, output shape)
    ({"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "norm": ("instance", {"eps": 1e-5})}, (2, 2, 32, 64, 48),
     (2, 3)),
    ({"spatial_dims": 2, "in_channels": 2, "out_channels": 3, "act": "PRELU"}, (2, 2, 32, 64), (2, 3)),
    ({"spatial_dims": 1, "in_channels": 2, "out_channels": 3}, (1, 2, 32), (1, 3)),
]  # fmt: skip
MONAI_MODELS = ["DenseNet121", "Densenet169", "densenet201", "DenseNet264"]


def monai_converted(model_name: str, kwargs: dict):
    from monai.networks import nets

    torch.manual_seed(0)
    original = getattr(nets, model_name)(pretrained=False, **kwargs)
    converted = fastdense.convert(copy.deepcopy(original))
    return original, converted


@pytest.mark.parametrize("case", range(len(MONAI_CASES)), ids=["3d-instance", "2d-prelu", "1d"])
@pytest.mark.parametrize("model_name", MONAI_MODELS)
def test_monai_densenet_shape(model_name, case):
    kwargs, input_shape, expected_shape = MONAI_CASES[case]
    original, converted = monai_converted(model_name, kwargs)
    blocks = sum(isinstance(m, fastdense.FastDenseBlock) for m in converted.modules())
    # Instance norm and PReLU layers stay MONAI's, with the rest of the network; 1-D converts.
    assert blocks == (4 if case == 2 else 0)
    if blocks == 0:
        assert repr(converted) == repr(original)
        assert [type(m) for m in converted.modules()] == [type(m) for m in original.modules()]
    x = torch.randn(input_shape)
    with torch.no_grad():
        result = converted.eval()(x)
        want = original.eval()(x)
    assert result.shape == expected_shape
    torch.testing.assert_close(result, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [0, 2], ids=["3d-instance", "1d"])
@pytest.mark.parametrize("model_name", MONAI_MODELS)
def test_monai_densenet_script_save(model_name, case, tmp_path):
    """MONAI's TorchScript save test (its cases: 3-D with instance norm), and the 1-D case, which converts:
    scripted, saved, loaded, against the eager model."""
    kwargs, input_shape, _ = MONAI_CASES[case]
    _, converted = monai_converted(model_name, kwargs)
    x = torch.randn(input_shape)
    converted.eval()
    with torch.no_grad():
        want = converted(x)
        scripted_out, loaded_out = _scripted_round_trip(converted, x, tmp_path)
    torch.testing.assert_close(scripted_out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded_out, want, rtol=1e-4, atol=1e-5)
