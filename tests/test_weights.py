"""weights=: torchvision's weight enums load through torchvision, legacy checkpoint keys included.

Nothing can be downloaded here, so the test writes a checkpoint in the format of torchvision's
published files (old keys ``norm.1``, ``conv.2``, ...; no ``num_batches_tracked``, which predates them)
where torch.hub looks for its cached copy.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torchvision
from torchvision.models import DenseNet121_Weights

import fastdense
from fastdense.tools.verify import randomize_batchnorm


def legacy_key(key: str) -> str:
    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)


@pytest.fixture
def cached_legacy_checkpoint(tmp_path, monkeypatch):
    """A random densenet121 checkpoint with legacy keys, where torchvision's download would put it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    source = randomize_batchnorm(torchvision.models.densenet121())
    legacy = {legacy_key(k): v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(legacy, checkpoints / os.path.basename(DenseNet121_Weights.IMAGENET1K_V1.url))
    return source.state_dict()


def test_weights_enum_loads_legacy_checkpoint(cached_legacy_checkpoint):
    model = fastdense.densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1)
    assert isinstance(model, fastdense.FastDenseNet)
    for key, value in cached_legacy_checkpoint.items():
        expected = torch.zeros_like(value) if key.endswith("num_batches_tracked") else value
        assert torch.equal(model.state_dict()[key], expected), key
    reference = torchvision.models.densenet121(weights="DEFAULT")  # torchvision, same cached file
    model.eval()
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_legacy_pretrained_flag(cached_legacy_checkpoint):
    with pytest.warns(UserWarning) as record:  # torchvision's deprecation warnings, as for its own models
        model = fastdense.densenet121(pretrained=True)
    assert any("'pretrained' is deprecated" in str(w.message) for w in record)
    key = "features.denseblock4.denselayer16.conv2.weight"
    assert torch.equal(model.state_dict()[key], cached_legacy_checkpoint[key])


def test_weights_fix_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        fastdense.densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1, num_classes=10)
