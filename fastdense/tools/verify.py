"""Side-by-side numerical comparison of a fastdense model with its torchvision twin.

Used by the main job's report (``python -m fastdense``) and the test suite: both models get the same
weights, with BatchNorm affine parameters and running statistics randomised (fresh models have 1/0,
which would hide errors), then run on the same inputs; every output, gradient and buffer is compared.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm random weight, bias, running mean and running variance (in place)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                for tensor, low, high in (
                    (module.weight, 0.5, 1.5),
                    (module.bias, -0.5, 0.5),
                    (module.running_mean, -0.5, 0.5),
                    (module.running_var, 0.5, 2.0),
                ):
                    if tensor is not None:
                        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
                        tensor.copy_(values * (high - low) + low)
    return model


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (the absolute error when expected is 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    diff = torch.linalg.vector_norm(actual - expected)
    scale = torch.linalg.vector_norm(expected)
    return float(diff / scale) if scale > 0 else float(diff)


def compare(
    fast: nn.Module, reference: nn.Module, inputs: Iterable[Tensor], training: bool, seed: int = 0
) -> dict[str, float]:
    """Run both models on each input (forward and backward) and return the largest relative errors.

    Keys: ``output``, ``input_grad``, ``param_grad`` (worst parameter), ``running_stats`` (worst
    float buffer, compared after all inputs) and ``num_batches_tracked`` (0.0 when every counter
    agrees, else 1.0). Parameter names must agree one to one.
    """
    generator = torch.Generator().manual_seed(seed)
    fast.train(training)
    reference.train(training)
    errors = dict.fromkeys(("output", "input_grad", "param_grad", "running_stats", "num_batches_tracked"), 0.0)
    fast_params, ref_params = dict(fast.named_parameters()), dict(reference.named_parameters())
    if list(fast_params) != list(ref_params):
        raise ValueError("the two models' parameter names differ")
    for x in inputs:
        x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_fast, out_ref = fast(x_fast), reference(x_ref)
        weights = torch.randn(out_ref.shape, generator=generator, dtype=torch.float64).to(out_ref)
        (out_ref * weights).sum().backward()
        (out_fast * weights).sum().backward()
        errors["output"] = max(errors["output"], relative_error(out_fast, out_ref))
        errors["input_grad"] = max(errors["input_grad"], relative_error(x_fast.grad, x_ref.grad))
        for name, ref_param in ref_params.items():
            fast_param = fast_params[name]
            errors["param_grad"] = max(errors["param_grad"], relative_error(fast_param.grad, ref_param.grad))
            fast_param.grad = ref_param.grad = None
    fast_buffers = dict(fast.named_buffers())
    for name, ref_buffer in reference.named_buffers():
        if ref_buffer.is_floating_point():
            errors["running_stats"] = max(errors["running_stats"], relative_error(fast_buffers[name], ref_buffer))
        elif not torch.equal(fast_buffers[name], ref_buffer):
            errors["num_batches_tracked"] = 1.0
    return errors
