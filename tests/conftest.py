"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
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
