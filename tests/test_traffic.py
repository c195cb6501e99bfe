"""The traffic counter (``python -m fastdense traffic``): what it counts, on fake tensors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastdense
from fastdense.tools.traffic import TrafficCounter, count_step


def counted(fn, *shapes):
    with FakeTensorMode():
        tensors = [torch.empty(shape) for shape in shapes]
        counter = TrafficCounter()
        with counter:
            fn(*tensors)
    return counter


def test_an_operator_counts_what_it_reads_and_writes():
    counter = counted(lambda a, b: a @ b, (6, 5), (5, 3))
    assert counter.count.launches == 1 and counter.count.bytes == (6 * 5 + 5 * 3 + 6 * 3) * 4
    counter = counted(lambda a: a.add_(1.0), (4, 8))
    assert counter.count.launches == 1 and counter.count.bytes == 2 * 4 * 8 * 4  # in place: read and written


def test_an_out_argument_is_only_written():
    counter = counted(lambda a, b, out: torch.mm(a, b, out=out), (6, 5), (5, 3), (6, 3))
    assert counter.count.launches == 1 and counter.count.bytes == (6 * 5 + 5 * 3 + 6 * 3) * 4


def test_the_torch_backend_takes_the_named_devices_choices():
    """Counted as on a GPU, a column statistic is one reduction; as on the CPU, the two-pass one."""
    from fastdense.devices import counted_as
    from fastdense.torch_ops import column_var_mean

    with counted_as("cuda"):
        gpu = counted(column_var_mean, (64, 8))
    with counted_as("cpu"):
        cpu = counted(column_var_mean, (64, 8))
    assert set(gpu.by_operator) == {"aten.var_mean.correction"}, dict(gpu.by_operator)
    assert cpu.count.launches > 1 and "aten.var_mean.correction" not in cpu.by_operator


def test_views_allocations_and_no_op_conversions_are_free():
    def free(x):
        x.view(8, 4).t()[:, :2].unsqueeze(0)
        x.to(torch.float32)
        x.contiguous()
        x.detach()
        torch.empty_like(x)

    counter = counted(free, (4, 8))
    assert counter.count.launches == 0 and counter.count.bytes == 0, dict(counter.by_operator)
    assert counted(lambda x: x.to(torch.bfloat16), (4, 8)).count.bytes == 4 * 8 * (4 + 2)  # a real conversion


def test_the_counter_sees_inside_fastdenses_registered_operators():
    with FakeTensorMode():
        block = fastdense.FastDenseBlock(3, 8, 2, 4, backend="torch")
        x = torch.empty(2, 8, 6, 6, requires_grad=True)
        counter = TrafficCounter()
        with counter:
            block(x).sum().backward()
    names = set(counter.by_operator)
    assert not any("fastdense" in name for name in names), names
    assert {"aten.mm.default", "aten.convolution_backward.default"} <= names, names
    assert any(name.startswith(("aten.conv2d", "aten.convolution.")) for name in names), names
    rows = counter.count.rows
    assert rows["stats"][0] and rows["gemm"][0] and rows["conv"][0] and rows["norm/finalize"][0], rows


def test_a_step_of_each_provider_is_counted_by_stage():
    tv, fast = (count_step(p, "densenet121", "train", 2, 32, "float32") for p in ("torchvision-eager", "fastdense"))
    assert tv.rows["concat"][0] == 58 + 4 and not fast.rows["concat"][0]  # torchvision's cats, none in fastdense
    assert fast.rows["stats"][0] and not tv.rows["stats"][0]  # statistics once per segment
    for result in (tv, fast):
        assert result.launches == sum(row[0] for row in result.rows.values())
        assert result.bytes == sum(row[1] for row in result.rows.values())
        assert result.flops == sum(row[2] for row in result.rows.values()) > 0
        assert result.kernels == sum(row[3] for row in result.rows.values()) == 0  # no Triton kernels here
        assert result.operators == result.launches and sum(n for n, _ in result.by_operator.values()) == result.launches
        assert result.compulsory_bytes == sum(row[4] for row in result.rows.values()) == result.bytes  # ATen: all
        assert result.rows["stem"][0] and result.rows["transition"][0] and result.rows["head"][0]


def test_the_torch_backend_stays_lean():
    """Issue 13's bounds, counted at its configuration (densenet121, batch 64, 224^2, bfloat16 autocast; a
    count: deterministic, and as quick at this size as at any other on fake tensors): at most 2.5x
    torchvision's operators in training and inference, at most 1.2x its bytes in training and 0.9x in
    inference."""
    for mode in ("train", "infer"):
        tv, fast = (count_step(p, "densenet121", mode, 64, 224, "bfloat16") for p in ("torchvision-eager", "fastdense"))
        assert fast.launches <= 2.5 * tv.launches, (mode, fast.launches, tv.launches)
        assert fast.bytes <= (0.9 if mode == "infer" else 1.2) * tv.bytes, (mode, fast.bytes, tv.bytes)


def test_conversions_inside_fastdenses_operators_are_counted():
    """Inside a registered operator PyTorch's composite operators reach the counter whole; a conversion
    that copies is counted as the copy it runs (the block's weights, cast by one multi-tensor copy)."""
    with FakeTensorMode():
        block = fastdense.FastDenseBlock(2, 8, 2, 4, backend="torch")
        x = torch.empty(2, 8, 6, 6)
        counter = TrafficCounter()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            block(x)
    names = set(counter.by_operator)
    assert "aten._foreach_copy_.default" in names and "aten.to.dtype" not in names, names  # the weights' cast


def test_the_command_prints_and_writes_json(tmp_path):
    out = tmp_path / "traffic.json"
    args = ["--batch", "2", "--resolution", "32", "--mode", "infer", "--dtype", "float32", "--json", str(out)]
    done = subprocess.run([sys.executable, "-m", "fastdense", "traffic", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "a floor, never a time" in done.stdout
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["torchvision-eager", "fastdense"] and all(r["bytes"] > 0 for r in rows)
    keys = {"provider", "mode", "launches", "kernels", "operators", "bytes", "flops", "compulsory_bytes", "floors",
            "by_operator"}  # fmt: skip
    assert all(keys <= set(r) and r["floors"]["H200, data sheet"] > 0 for r in rows), rows


def test_the_triton_backend_is_counted_launch_by_launch():
    """Every kernel launch of a triton-backend step is a row with its tile plan's bytes and FLOPs, beside the
    ATen operators the backend still runs; the products are the same work as the torch backend's."""
    from fastdense.tools.traffic import _counted_step

    for mode in ("train", "infer"):
        triton, launches = _counted_step("fastdense-triton", "densenet121", mode, 2, 32, "bfloat16", "cuda")
        torch_backend = count_step("fastdense", "densenet121", mode, 2, 32, "bfloat16")
        kernel_rows = [row for row in triton.rows.values() if row[3]]
        assert triton.kernels == len(launches) == sum(row[3] for row in triton.rows.values()) > 0
        assert triton.launches == triton.kernels + triton.operators and triton.operators > 0  # ATen beside them
        planned = [launch.moved() for launch in launches]
        assert sum(p.flops for p in planned) <= triton.flops == torch_backend.flops, (mode, triton.flops)
        assert triton.compulsory_bytes == triton.bytes - sum(p.reread for p in planned) < triton.bytes
        names = [launch.kernel for launch in launches]
        per_layer = ["bn_relu_gemm", "conv3x3"] + (["dgrad", "wgrad"] if mode == "train" else [])
        assert all(names.count(kernel) == 58 for kernel in per_layer), names  # densenet121's 58 layers
        assert "merge_partials" not in names  # the kernels merge their own statistics
        assert kernel_rows and all(row[1] >= row[4] for row in triton.rows.values())


def test_flops_agree_with_pytorchs_flop_counter():
    """The counter's FLOPs of a torchvision step are those ``torch.utils.flop_counter.FlopCounterMode``
    counts for the same step."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdense.tools.providers import PROVIDERS

    counted = count_step("torchvision-eager", "densenet121", "infer", 2, 32, "float32")
    net = PROVIDERS["torchvision-eager"].build("densenet121").eval()
    with FlopCounterMode(display=False) as flop_counter, torch.inference_mode():
        net(torch.randn(2, 3, 32, 32))
    assert counted.flops == flop_counter.get_total_flops() > 0


def test_a_floor_is_the_slower_of_compute_and_memory_plus_the_launch():
    from fastdense.tools.roofline import CARDS, LAUNCH_SECONDS
    from fastdense.tools.traffic import Count

    count = Count(half_precision=True)
    count.add("gemm", nbytes=8 * 10**9, flops=10**9, kernel=True, compulsory=4 * 10**9)  # memory-bound
    count.add("conv", nbytes=10**6, flops=10**15)  # compute-bound
    for card, seconds in count.floors.items():
        matmul, _, bandwidth = CARDS[card]
        assert seconds == pytest.approx(4e9 / bandwidth + 1e15 / matmul + 2 * LAUNCH_SECONDS), card
    assert Count(half_precision=False).floors == {}  # no floor before a launch
    float32 = Count(half_precision=False)
    float32.add("gemm", 0, 10**15)
    assert set(float32.floors) == {card for card, (_, tf32, _) in CARDS.items() if tf32}  # no TF32 figure: none


def test_the_triton_backend_meets_the_inference_traffic_target():
    """Issue 26's inference target, in the counted bytes a step must move (compulsory: kernels' re-reads of
    what their programs read already left out): at most 0.35x torchvision eager's, densenet121, batch 64,
    224^2, bfloat16 autocast, channels_last, as on a GPU."""
    tv, fused = (
        count_step(p, "densenet121", "infer", 64, 224, "bfloat16") for p in ("torchvision-eager", "fastdense-triton")
    )
    assert fused.compulsory_bytes <= 0.35 * tv.compulsory_bytes, (fused.compulsory_bytes, tv.compulsory_bytes)


def test_multi_tensor_operators_launch_as_cuda_groups_them():
    """``torch._foreach_*`` on CUDA: one launch per 448 tensors (two lists) or 2240 chunks of 64 Ki elements,
    whichever fills first; empty tensors take no part (PyTorch's multi_tensor_apply, 32 KB arguments)."""
    from fastdense.tools.traffic import foreach_launches

    assert foreach_launches([1] * 364, depth=2) == 1  # densenet121's SGD update: one launch
    assert foreach_launches([1] * 449, depth=2) == 2 and foreach_launches([1] * 449, depth=1) == 1
    assert foreach_launches([2240 * 65536 + 1], depth=2) == 2  # a tensor cut across two launches
    assert foreach_launches([0, 0], depth=2) == 0
    with FakeTensorMode():
        params = [torch.empty(3) for _ in range(500)]
        counter = TrafficCounter()
        with counter:
            torch._foreach_add_(params, params)
    assert counter.count.launches == 2 and counter.count.bytes == 500 * 3 * 4 * 3  # two read, one written


@pytest.mark.parametrize("batch", [64, 256])
def test_a_training_step_meets_the_launch_targets(batch):
    """Issue 31's counted targets (densenet121, 224^2, bf16 autocast, channels_last, SGD foreach): the triton
    backend's training step in at most 0.4x torchvision eager's launches with an H200 floor at most 0.6x its
    floor; the torch backend's in at most 1.2x its launches."""
    tv, torch_backend, triton = (
        count_step(p, "densenet121", "train", batch, 224, "bfloat16")
        for p in ("torchvision-eager", "fastdense", "fastdense-triton")
    )
    assert triton.launches <= 0.4 * tv.launches, (triton.launches, tv.launches)
    assert triton.floors["H200, data sheet"] <= 0.6 * tv.floors["H200, data sheet"], (triton.floors, tv.floors)
    assert torch_backend.launches <= 1.2 * tv.launches, (torch_backend.launches, tv.launches)


def test_inference_meets_the_launch_targets():
    """Inference, batch 64: the triton backend in at most 0.3x torchvision eager's launches, the torch backend in
    at most 1.2x (and below torchvision's floor)."""
    tv, torch_backend, triton = (
        count_step(p, "densenet121", "infer", 64, 224, "bfloat16")
        for p in ("torchvision-eager", "fastdense", "fastdense-triton")
    )
    assert triton.launches <= 0.3 * tv.launches and torch_backend.launches <= 1.2 * tv.launches
    assert torch_backend.floors["H200, data sheet"] <= tv.floors["H200, data sheet"]
