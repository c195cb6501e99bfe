"""The traffic counter (``python -m fastdense traffic``): what it counts, on fake tensors."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert counter.count.ops == 1 and counter.count.bytes == (6 * 5 + 5 * 3 + 6 * 3) * 4
    counter = counted(lambda a: a.add_(1.0), (4, 8))
    assert counter.count.ops == 1 and counter.count.bytes == 2 * 4 * 8 * 4  # in place: read and written


def test_an_out_argument_is_only_written():
    counter = counted(lambda a, b, out: torch.mm(a, b, out=out), (6, 5), (5, 3), (6, 3))
    assert counter.count.ops == 1 and counter.count.bytes == (6 * 5 + 5 * 3 + 6 * 3) * 4


def test_the_torch_backend_takes_the_named_devices_choices():
    """Counted as on a GPU, a column statistic is one reduction; as on the CPU, the two-pass one."""
    from fastdense.devices import counted_as
    from fastdense.torch_ops import column_stats

    with counted_as("cuda"):
        gpu = counted(column_stats, (64, 8))
    with counted_as("cpu"):
        cpu = counted(column_stats, (64, 8))
    assert set(gpu.by_operator) == {"aten.var_mean.correction"}, dict(gpu.by_operator)
    assert cpu.count.ops > 1 and "aten.var_mean.correction" not in cpu.by_operator


def test_views_allocations_and_no_op_conversions_are_free():
    def free(x):
        x.view(8, 4).t()[:, :2].unsqueeze(0)
        x.to(torch.float32)
        x.contiguous()
        x.detach()
        torch.empty_like(x)

    counter = counted(free, (4, 8))
    assert counter.count.ops == 0 and counter.count.bytes == 0, dict(counter.by_operator)
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
        assert result.ops == sum(ops for ops, _ in result.rows.values())
        assert result.bytes == sum(nbytes for _, nbytes in result.rows.values())
        assert result.rows["stem"][0] and result.rows["transition"][0] and result.rows["head"][0]


def test_the_torch_backend_stays_lean():
    """Issue 13's bounds, counted at its configuration (densenet121, batch 64, 224^2, bfloat16 autocast; a
    count: deterministic, and as quick at this size as at any other on fake tensors): at most 2.5x
    torchvision's operators in training and inference, at most 1.2x its bytes in training and 0.9x in
    inference."""
    for mode in ("train", "infer"):
        tv, fast = (count_step(p, "densenet121", mode, 64, 224, "bfloat16") for p in ("torchvision-eager", "fastdense"))
        assert fast.ops <= 2.5 * tv.ops, (mode, fast.ops, tv.ops)
        assert fast.bytes <= (0.9 if mode == "infer" else 1.2) * tv.bytes, (mode, fast.bytes, tv.bytes)


def test_conversions_inside_fastdenses_operators_are_counted():
    """Inside a registered operator PyTorch's composite operators reach the counter whole; a conversion
    that copies (``x.float()`` of bfloat16 data) is counted as the copy it runs."""
    with FakeTensorMode():
        block = fastdense.FastDenseBlock(2, 8, 2, 4, backend="torch")
        x = torch.empty(2, 8, 6, 6)
        counter = TrafficCounter()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            block(x)
    names = set(counter.by_operator)
    assert "aten._to_copy.default" in names and "aten.to.dtype" not in names, names  # the weights' casts


def test_the_command_prints_and_writes_json(tmp_path):
    out = tmp_path / "traffic.json"
    args = ["--batch", "2", "--resolution", "32", "--mode", "infer", "--dtype", "float32", "--json", str(out)]
    done = subprocess.run([sys.executable, "-m", "fastdense", "traffic", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "a count, not a time" in done.stdout
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["torchvision-eager", "fastdense"] and all(r["bytes"] > 0 for r in rows)
