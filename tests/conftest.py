"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

import fastdense

# Property tests (tests/test_properties.py). "ci", the default: 200 examples, derandomised so a run is
# reproducible; "long": `pytest --hypothesis-profile long` for 2000 fresh examples. Failures print the
# minimal configuration (hypothesis' "Falsifying example").
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a developer's FASTDENSE_BACKEND must not leak in."""
    monkeypatch.delenv(fastdense.BACKEND_ENV_VAR, raising=False)


@pytest.fixture(autouse=True)
def _full_float32():
    """float32 tests compare at float32 accuracy (1e-5, 1e-6): no TF32 on a GPU, where cuDNN's switch is on
    by default and the Triton kernels' products follow it (``kernels.launch.dot_precision``); without this
    about 14 float32 kernel cases failed there. A test of TF32 itself turns it on."""
    # cuBLAS's switch is a property-like module attribute that monkeypatch cannot restore: kept by hand.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
