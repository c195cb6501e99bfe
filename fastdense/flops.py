"""FLOP formulas for fastdense's registered block operators, for ``torch.utils.flop_counter.FlopCounterMode``.

A FLOP counter sees a registered operator as one call (its implementation runs below the counter), so
without a formula a dense block counted nothing. The formulas count what PyTorch's counter counts for the
same network built of torchvision's (MONAI's, timm's) modules: the convolutions, at 2 FLOPs a
multiply-add (BatchNorm, ReLU and the concatenations count nothing there either).

* forward: each layer's 1x1 convolution (``C_l -> bn_size * k``) and 3x3 (``3x3x3`` in 3-D) convolution
  (``bn_size * k -> k``) over ``M = N * H * W`` pixels;
* backward: for each convolution its input gradient when its input needs one, and its weight gradient
  when the weight does, each as many FLOPs as the forward, as PyTorch's convolution backward counts;
  plus the 1x1 convolution computed again for each layer whose bottleneck the forward did not keep
  (``memory_efficient=True``, and some layers of large 3-D blocks on the CPU): torchvision's
  ``memory_efficient`` recomputes the same (its checkpoint), its default keeps every bottleneck.
"""

from __future__ import annotations

import math

from torch.utils.flop_counter import register_flop_formula

from .block_algorithm import PARAMS_PER_LAYER


def _layers(params: list) -> list[tuple[int, int, int, int]]:
    """(C_l, bottleneck width, new channels, taps of the 3x3 kernel) per layer, from the weight shapes."""
    layers = []
    for start in range(0, len(params), PARAMS_PER_LAYER):
        conv1, conv2 = params[start + 2], params[start + 5]
        layers.append((conv1[1], conv1[0], conv2[0], math.prod(conv2[2:])))
    return layers


def _conv_flops(pixels: int, c_in: int, c_out: int, taps: int) -> int:
    return 2 * pixels * c_in * c_out * taps


def block_forward_flops(x, params, *args, out_shape=None, **kwargs) -> int:
    """``fastdense::dense_block``: every layer's two convolutions (shapes in, as FlopCounterMode passes)."""
    pixels = x[0] * math.prod(x[2:])
    return sum(
        _conv_flops(pixels, c_in, width, 1) + _conv_flops(pixels, width, k, taps)
        for c_in, width, k, taps in _layers(params)
    )


def block_backward_flops(grad_out, out, params, running, stats, saved, *args, out_shape=None, **kwargs) -> int:
    """``fastdense::dense_block_backward``: the convolutions' input and weight gradients autograd would
    compute for torchvision's layers, and the 1x1 convolutions of bottlenecks not kept."""
    needs_input_grad = args[-1] if args else kwargs["needs_input_grad"]
    pixels = out[0] * math.prod(out[2:])
    per_layer = len(saved[1:]) // max(len(params) // PARAMS_PER_LAYER, 1)  # BlockState.flatten's layout
    # A tensor needs a gradient when anything it depends on does: the block input, or any parameter.
    upstream = needs_input_grad[0]
    total = 0
    for layer, (c_in, width, k, taps) in enumerate(_layers(params)):
        needs = needs_input_grad[1 + layer * PARAMS_PER_LAYER : 1 + (layer + 1) * PARAMS_PER_LAYER]
        norm1, conv1, norm2, conv2 = needs[0] or needs[1], needs[2], needs[3] or needs[4], needs[5]
        conv1_input = upstream or norm1  # relu1(norm1(cat)) needs a gradient
        conv2_input = conv1_input or conv1 or norm2  # relu2(norm2(bottleneck)) does
        one_by_one, three_by_three = _conv_flops(pixels, c_in, width, 1), _conv_flops(pixels, width, k, taps)
        total += three_by_three * (conv2_input + conv2) + one_by_one * (conv1_input + conv1)
        kept = math.prod(saved[1 + layer * per_layer]) > 0  # LayerState.bottleneck
        if not kept and (conv2_input or conv2):
            total += one_by_one  # the bottleneck, computed again
        upstream = conv2_input or conv2
    return total


def register(forward_op, backward_op) -> None:
    """Register the formulas for the block's forward and backward operators."""
    register_flop_formula(forward_op)(block_forward_flops)
    register_flop_formula(backward_op)(block_backward_flops)
