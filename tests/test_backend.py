"""Backend selection: auto, explicit choices, the FASTDENSE_BACKEND override, and what is reported."""

from __future__ import annotations

import pytest
import torch

import fastdense
from fastdense import backend

from .helpers import block_pair

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_torch_on_cpu():
    assert fastdense.resolve_backend("auto", CPU) == "torch"


def test_auto_picks_triton_on_cuda_only_once_it_is_the_default(monkeypatch):
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    assert fastdense.resolve_backend("auto", CUDA) == "torch"
    monkeypatch.setattr(backend, "TRITON_DEFAULT_ON_CUDA", True)
    assert fastdense.resolve_backend("auto", CUDA) == "triton"
    assert fastdense.resolve_backend("auto", CPU) == "torch"
    monkeypatch.setattr(backend, "triton_importable", lambda: False)
    assert fastdense.resolve_backend("auto", CUDA) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastdense.resolve_backend("triton", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend='triton' runs on CUDA tensors.*backend='torch'.*TRITON_INTERPRET"):
        fastdense.resolve_backend("triton", CPU)
    _, block = block_pair(1, 2, 2, 2, backend="triton")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        block(torch.randn(2, 2, 3, 3, dtype=torch.float64))
    monkeypatch.setattr(backend, "triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        fastdense.resolve_backend("triton", CUDA)


def test_triton_refuses_float64_clearly():
    _, block = block_pair(1, 2, 2, 2, backend="triton")
    with pytest.raises(TypeError, match=r"backend='triton' supports float32, float16 and bfloat16; got input dtype"):
        block(torch.randn(2, 2, 3, 3, dtype=torch.float64))


def test_environment_variable_sets_what_auto_means(monkeypatch):
    monkeypatch.setenv(fastdense.BACKEND_ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastdense.resolve_backend("auto", CPU) == "triton"
    assert fastdense.resolve_backend("torch", CPU) == "torch"  # an explicit choice wins
    monkeypatch.setenv(fastdense.BACKEND_ENV_VAR, " Torch ")
    assert fastdense.resolve_backend("auto", CPU) == "torch"
    monkeypatch.setenv(fastdense.BACKEND_ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="environment variable FASTDENSE_BACKEND must be one of"):
        fastdense.resolve_backend("auto", CPU)


def test_invalid_backend_names_are_refused():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton', got 'gpu'"):
        fastdense.FastDenseBlock(2, 3, 2, 2, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastdense.FastDenseNet(backend="gpu")


def test_block_reports_the_backend_it_ran():
    _, block = block_pair(2, 3, 2, 2)
    assert block.backend == "auto" and block.active_backend is None
    assert "backend='auto'" in repr(block) and "active_backend" not in repr(block)
    block(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert block.active_backend == "torch"
    assert "active_backend='torch'" in repr(block)
