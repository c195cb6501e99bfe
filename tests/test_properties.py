"""Property-based equivalence with torchvision (hypothesis): random block and network configurations,
fresh random weights with randomised BatchNorm parameters and running statistics, both modes, both
memory layouts, ``memory_efficient`` both ways, inputs with and without ``requires_grad``.

float64 (torch backend): output, input gradient, every parameter gradient and every buffer within
1e-9. float32: the forward (output, running statistics) within 1e-5 of torchvision; float32 gradients
are compared against torchvision's float64 ones as one vector (a single parameter's gradient can be a
cancelling sum), within 1e-4 or four times torchvision's own float32 error, whichever is larger. The
triton backend runs a smaller share of examples (the interpreter is slow) in float32.

Example counts follow the hypothesis profile (tests/conftest.py): "ci" by default, "long" for 2000.
"""

from __future__ import annotations

import torch
import torchvision
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torchvision.models.densenet import _DenseBlock

import fastdense
from fastdense.tools.verify import randomize_batchnorm, relative_error

from .test_triton_backend import DEVICE


def examples(fraction: float) -> int:
    return max(1, int(settings().max_examples * fraction))


@st.composite
def common(draw, max_batch=4):
    return {
        "n": draw(st.integers(1, max_batch)),
        "training": draw(st.booleans()),
        "memory_efficient": draw(st.booleans()),
        "channels_last": draw(st.booleans()),
        "input_grad": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@st.composite
def block_configs(draw, dtypes=(torch.float64, torch.float32)):
    config = draw(common())
    config |= {
        "num_layers": draw(st.integers(1, 4)),
        "c0": draw(st.integers(1, 8)),
        "bn_size": draw(st.integers(1, 4)),
        "growth": draw(st.integers(1, 6)),
        "h": draw(st.integers(1, 6)),
        "w": draw(st.integers(1, 6)),
        "dtype": draw(st.sampled_from(dtypes)),
    }
    assume(not (config["training"] and config["n"] * config["h"] * config["w"] == 1))  # both raise
    return config


@st.composite
def network_configs(draw):
    config = draw(common(max_batch=3))
    blocks = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    side = 4 * 2 ** (len(blocks) - 1)  # the stem quarters the input, each transition halves it
    config |= {
        "block_config": blocks,
        "growth_rate": draw(st.integers(1, 4)),
        "num_init_features": draw(st.integers(2, 8)),
        "bn_size": draw(st.integers(1, 3)),
        "h": draw(st.integers(side, side + 12)),
        "w": draw(st.integers(side, side + 12)),
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
    }
    assume(not (config["training"] and config["n"] == 1))  # the last block may be 1x1: one value per channel
    return config


def make_input(config, channels, dtype, device="cpu"):
    g = torch.Generator().manual_seed(config["seed"] + 7)
    x = torch.randn(config["n"], channels, config["h"], config["w"], generator=g, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    if config["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(config["input_grad"])


def run(model, x, training):
    """Output, input gradient (or None), all parameter gradients as one vector, all buffers."""
    model.train(training)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).view(out.shape)
    (out.double() * weights).sum().backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    buffers = [b.double() for b in model.buffers()]
    return out.double(), None if x.grad is None else x.grad.double(), grads, buffers


def check(fast_result, ref_result, gold_result, dtype):
    """fastdense against torchvision in the same dtype (forward), and both against torchvision in
    float64 (gradients): in float32 fastdense may be no worse than 1e-4 or four times torchvision's own
    error, whichever is larger (a BatchNorm over a handful of values is ill-conditioned for both)."""
    out, x_grad, grads, buffers = fast_result
    ref_out, ref_x_grad, ref_grads, ref_buffers = ref_result
    forward_tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert relative_error(out, ref_out) <= forward_tol, "output"
    for i, (b, ref_b) in enumerate(zip(buffers, ref_buffers, strict=True)):
        assert relative_error(b, ref_b) <= forward_tol, f"buffer {i}"
    _, gold_x_grad, gold_grads, _ = gold_result
    assert (x_grad is None) == (gold_x_grad is None)
    pairs = [("parameter gradients", grads, ref_grads, gold_grads)]
    if x_grad is not None:
        pairs.append(("input gradient", x_grad, ref_x_grad, gold_x_grad))
    for what, fast, ref, gold in pairs:
        if dtype == torch.float64:
            assert relative_error(fast, ref) <= 1e-9, what
        else:
            allowed = max(1e-4, 4 * relative_error(ref, gold))
            assert relative_error(fast, gold) <= allowed, (what, relative_error(fast, gold), allowed)


def block_models(config, backend, dtype, device="cpu"):
    torch.manual_seed(config["seed"])
    ref = _DenseBlock(config["num_layers"], config["c0"], config["bn_size"], config["growth"], drop_rate=0.0)
    randomize_batchnorm(ref, torch.Generator().manual_seed(config["seed"] + 1))
    fast = fastdense.FastDenseBlock(
        config["num_layers"], config["c0"], config["bn_size"], config["growth"],
        memory_efficient=config["memory_efficient"], backend=backend,
    )  # fmt: skip
    fast.load_state_dict(ref.state_dict())
    gold = _DenseBlock(config["num_layers"], config["c0"], config["bn_size"], config["growth"], drop_rate=0.0)
    gold.load_state_dict(ref.state_dict())
    return fast.to(device, dtype), ref.to(device, dtype), gold.to(device, torch.float64)


def check_block(config, backend, device="cpu"):
    dtype = config["dtype"]
    fast, ref, gold = block_models(config, backend, dtype, device)
    x = make_input(config, config["c0"], dtype, device)
    results = [
        run(m, x.to(m_dtype), config["training"]) for m, m_dtype in ((fast, dtype), (ref, dtype), (gold, torch.float64))
    ]
    check(*results, dtype)


@given(block_configs())
def test_block_matches_torchvision(config):
    check_block(config, "torch")


@settings(max_examples=examples(0.5))
@given(network_configs())
def test_network_matches_torchvision(config):
    dtype = config.pop("dtype")
    arch = {k: config[k] for k in ("growth_rate", "block_config", "num_init_features", "bn_size")}
    torch.manual_seed(config["seed"])
    ref = randomize_batchnorm(torchvision.models.DenseNet(**arch, num_classes=3), torch.Generator().manual_seed(1))
    fast = fastdense.FastDenseNet(**arch, num_classes=3, memory_efficient=config["memory_efficient"], backend="torch")
    fast.load_state_dict(ref.state_dict())
    gold = torchvision.models.DenseNet(**arch, num_classes=3)
    gold.load_state_dict(ref.state_dict())
    x = make_input(config, 3, dtype)
    results = [
        run(m.to(dt), x.to(dt), config["training"]) for m, dt in ((fast, dtype), (ref, dtype), (gold, torch.float64))
    ]
    check(*results, dtype)


@settings(max_examples=examples(0.2))
@given(block_configs(dtypes=(torch.float32,)))
def test_triton_block_matches_torchvision(config):
    check_block(config, "triton", DEVICE)
