"""Helpers for the tests: torchvision twins of fastdense modules with identical random weights."""

from __future__ import annotations

import torch
from torchvision.models.densenet import _DenseBlock

import fastdense
from fastdense.tools.verify import randomize_batchnorm, relative_error

# Largest relative error (vector norm) accepted against torchvision, per dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


def block_pair(num_layers, c0, bn_size, growth, *, dtype=torch.float64, seed=0, **kwargs):
    """A torchvision ``_DenseBlock`` with random weights and BatchNorm state, and a fastdense copy."""
    torch.manual_seed(seed)
    ref = _DenseBlock(num_layers, c0, bn_size, growth, drop_rate=kwargs.get("drop_rate", 0.0))
    randomize_batchnorm(ref, torch.Generator().manual_seed(seed + 1))
    fast = fastdense.FastDenseBlock(num_layers, c0, bn_size, growth, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref.to(dtype), fast.to(dtype)


def assert_rel_close(actual, expected, tol, what=""):
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_same_grads_and_buffers(fast, ref, tol):
    ref_params = dict(ref.named_parameters())
    assert list(dict(fast.named_parameters())) == list(ref_params)
    for name, param in fast.named_parameters():
        assert param.grad is not None, name
        assert_rel_close(param.grad, ref_params[name].grad, tol, f"grad of {name}")
    ref_buffers = dict(ref.named_buffers())
    for name, buf in fast.named_buffers():
        if buf.is_floating_point():
            assert_rel_close(buf, ref_buffers[name], tol, name)
        else:
            assert torch.equal(buf, ref_buffers[name]), f"{name}: {buf} != {ref_buffers[name]}"
