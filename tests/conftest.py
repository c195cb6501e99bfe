"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest

import fastdense


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a developer's FASTDENSE_BACKEND must not leak in."""
    monkeypatch.delenv(fastdense.BACKEND_ENV_VAR, raising=False)


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the chunked loops (row chunks in blocks, channel chunks in BN-ReLU-pool) take many steps."""
    monkeypatch.setattr(fastdense.batchnorm, "CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(fastdense.batchnorm, "MIN_CHUNK", 1)
