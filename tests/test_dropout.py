"""Dropout on the new features (drop_rate > 0, training): distribution, scaling, and the backward
using the very mask the forward drew."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.models.densenet as tv_densenet

from .helpers import TOLERANCE, assert_rel_close, assert_same_grads_and_buffers, block_pair


def new_feature_columns(out, c0, growth, layer):
    lo = c0 + layer * growth
    return out[:, lo : lo + growth]


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_drop_rate_and_scaling(p):
    """Each new feature is zeroed with probability p and the survivors are scaled by 1 / (1 - p)."""
    c0, growth = 3, 4
    _, fast = block_pair(1, c0, 2, growth)
    x = torch.randn(16, c0, 24, 24, dtype=torch.float64)
    with torch.no_grad():  # the same training-mode forward, without and with dropout
        undropped = new_feature_columns(fast(x), c0, growth, 0)
        fast.denselayer1.drop_rate = p
        dropped = new_feature_columns(fast(x), c0, growth, 0)
    kept = dropped != 0
    n = kept.numel()
    rate = 1 - kept.double().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (rate, p)  # within 4 standard errors
    torch.testing.assert_close(dropped[kept], undropped[kept] / (1 - p), rtol=1e-12, atol=0)


def test_eval_mode_never_drops():
    ref, fast = block_pair(3, 3, 2, 2, drop_rate=0.5)
    ref.eval()
    fast.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert_rel_close(fast(x), ref(x), TOLERANCE[torch.float64], "eval output with drop_rate")


def test_drop_rate_one_zeroes_new_features_like_torchvision():
    _, fast = block_pair(2, 3, 2, 2, drop_rate=1.0)
    out = fast.train()(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert torch.count_nonzero(out[:, 3:]) == 0


def test_gradients_follow_the_forward_mask(monkeypatch):
    """Infer each layer's mask from fastdense's output, replay it in torchvision's dropout, and compare
    outputs and every gradient: the backward must use exactly the mask the forward used."""
    c0, growth, num_layers, p = 3, 4, 3, 0.3
    ref, fast = block_pair(num_layers, c0, 2, growth, drop_rate=p)
    ref.train()
    fast.train()
    x = torch.randn(4, c0, 7, 6, dtype=torch.float64)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast = fast(x_fast)
    masks = [new_feature_columns(out_fast, c0, growth, i).detach() != 0 for i in range(num_layers)]
    assert all(0 < m.double().mean() < 1 for m in masks)

    replay = iter(masks)

    class ReplayDropout:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def dropout(features, p, training):
            assert training
            return features * next(replay).to(features.dtype) / (1 - p)

    monkeypatch.setattr(tv_densenet, "F", ReplayDropout())
    out_ref = ref(x_ref)
    assert_rel_close(out_fast, out_ref, TOLERANCE[torch.float64], "output with the same masks")
    grad = torch.randn_like(out_ref)
    out_fast.backward(grad)
    out_ref.backward(grad)
    assert_rel_close(x_fast.grad, x_ref.grad, TOLERANCE[torch.float64], "input grad")
    assert_same_grads_and_buffers(fast, ref, TOLERANCE[torch.float64])


def test_invalid_drop_rate_is_refused():
    _, fast = block_pair(1, 3, 2, 2)
    fast.denselayer1.drop_rate = 1.5
    with pytest.raises(ValueError, match=r"denselayer1.drop_rate must be between 0 and 1, got 1.5"):
        fast(torch.randn(2, 3, 4, 4, dtype=torch.float64))
