"""``python -m fastdense traffic``: the memory traffic and operator launches of one step, counted.

A count, not a time: every ATen operator a step runs is recorded on fake tensors (``FakeTensorMode``:
shapes and dtypes only, no data, no compute, so any batch and resolution runs on the CPU), with the
bytes it reads and writes: the sizes of its tensor arguments plus those of its tensor results (an
in-place operator reads and writes its tensor: twice; an ``out=`` argument is only written: once).
Views, aliases and allocations are free and not counted as launches; a conversion to the dtype a
tensor already has dispatches nothing. fastdense's registered block operators are opened: their own
implementation runs under the counter, so the operators inside a dense block count like any other.
fastdense's torch backend takes the operator choices of the device named by ``--as-device`` (a GPU's
by default: what the count is for). Where it would choose by the data (which layers may take norm1's
sums from conv1's weight gradient: ``torch_ops.norm1_weight_grad_serves``), fake tensors have none: the
count takes the path of ordinary parameters (fresh ones, and torchvision's pretrained DenseNet-121's).

Each operator is attributed to a stage: inside fastdense, the stage it runs in (``fastdense.stages``);
elsewhere (torchvision, the loss, the optimizer) by what it is: a convolution by its kernel (1x1: gemm,
3x3: conv, larger: stem), a BatchNorm or ReLU to norm, pooling to stem, transition or head by its window.
On a GPU most of these operators are memory-bound launches: bytes over bandwidth and launches times
their overhead are floors a step cannot beat, which is what this count is for.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch._C import DispatchKey
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastdense import stages
from fastdense.block_op import OPENED
from fastdense.devices import counted_as

from .measure import DTYPES, MODES
from .providers import MODELS, PROVIDERS

# fastdense stage -> the breakdown's row.
STAGE_ROWS = {
    "stats": "stats", "gemm": "gemm", "gemm_backward": "gemm", "conv": "conv", "conv_backward": "conv",
    "norm_backward": "norm/finalize", "finalize": "norm/finalize",
    "stem": "stem", "stem_backward": "stem", "transition": "transition", "transition_backward": "transition",
    "head": "head", "head_backward": "head",
}  # fmt: skip
ROWS = ("stats", "gemm", "conv", "norm/finalize", "concat", "stem", "transition", "head", "other")
FREE = {
    "aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default", "aten.detach.default",
    "aten.alias.default", "aten.lift_fresh.default", "aten.new_empty.default", "aten.new_empty_strided.default",
}  # fmt: skip


def _composite(func) -> bool:
    """Whether ``func`` is a composite of other operators. Inside the opened operators these reach the
    counter whole (the autograd keys that would decompose them are below it there): ``x.to(dtype)``,
    ``contiguous`` or ``reshape`` look like views but copy when they must."""
    return func.namespace == "aten" and func.has_kernel_for_dispatch_key(DispatchKey.CompositeImplicitAutograd)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _row_of(func, args) -> str:
    """The breakdown row of an operator outside fastdense's stages, by what it computes."""
    name = func.__name__
    if name.startswith("conv") or "convolution" in name:
        weight = args[2] if "backward" in name else args[1]
        kernel = math.prod(weight.shape[2:])
        return "gemm" if kernel == 1 else "conv" if kernel <= 27 else "stem"
    if "batch_norm" in name or "threshold_backward" in name or name.startswith(("relu", "clamp_min")):
        return "norm/finalize"
    if name.startswith("cat"):
        return "concat"
    if "max_pool" in name:
        return "stem"
    if "avg_pool" in name:
        return "transition"
    if name.startswith(("mean", "addmm", "mm", "linear", "_adaptive_avg_pool")):
        return "head"
    return "other"


@dataclass
class Count:
    """Operators launched and bytes moved, in total and per breakdown row."""

    ops: int = 0
    bytes: int = 0
    rows: dict[str, list[int]] = field(default_factory=lambda: {row: [0, 0] for row in ROWS})

    def add(self, row: str, nbytes: int) -> None:
        self.ops += 1
        self.bytes += nbytes
        self.rows[row][0] += 1
        self.rows[row][1] += nbytes


class TrafficCounter(TorchDispatchMode):
    """Counts every ATen operator run under it (use above a ``FakeTensorMode``: nothing is computed)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = Count()
        self.by_operator: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in OPENED:  # a fastdense operator: count what it runs, not the operator itself
            with self:
                return OPENED[func](*args, **kwargs)
        if _composite(func):  # what it runs, as outside an operator (``.float()``: the copy, if any)
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        name = str(func)
        results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if func.is_view or name in FREE or not results:  # views, allocations, metadata queries
            return out
        written_only = {a.name for a in func._schema.arguments if a.is_out}  # out=: written, not read
        read = (args, {name: value for name, value in kwargs.items() if name not in written_only})
        nbytes = _bytes(tree_leaves(read)) + _bytes(results)
        active = [STAGE_ROWS[s] for s in stages.ACTIVE if s in STAGE_ROWS]
        self.count.add(active[-1] if active else _row_of(func, args), nbytes)
        self.by_operator[name][0] += 1
        self.by_operator[name][1] += nbytes
        return out


@dataclass
class Traffic:
    provider: str
    model: str
    mode: str
    batch: int
    resolution: int
    dtype: str
    as_device: str
    ops: int
    bytes: int
    rows: dict[str, list[int]]
    note: str = "a count of operators and of the bytes they read and write, not a time"


def count_step(
    provider: str, model: str, mode: str, batch: int, resolution: int, dtype: str, as_device: str = "cuda"
) -> Traffic:
    """One inference forward or one training step (forward, cross-entropy, backward, SGD update) of
    ``provider``'s ``model`` on fake tensors, counted. ``as_device``: the device type whose operator
    choices fastdense's torch backend takes (the fake tensors themselves are CPU tensors: PyTorch's
    autograd engine needs a real GPU for CUDA ones)."""
    return _counted_step(provider, model, mode, batch, resolution, dtype, as_device)[0]


def step_launches(provider: str, model: str, mode: str, batch: int, resolution: int, dtype: str) -> list:
    """The Triton kernel launches (``kernels.launch.Launch``) of one step of ``provider`` as a GPU would
    make them, recorded on fake tensors (none for providers without the triton backend). float32 counts
    with TF32 off, the products' full precision (as the GPU check's correctness stage runs it)."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _counted_step(provider, model, mode, batch, resolution, dtype, "cuda")[1]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _counted_step(provider, model, mode, batch, resolution, dtype, as_device) -> tuple[Traffic, list]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastdense.kernels.launch import recording

    compute = DTYPES[dtype]
    with FakeTensorMode(allow_non_fake_inputs=True), counted_as(as_device), recording() as launches:
        net = PROVIDERS[provider].build(model).train(mode == "train")
        x = torch.randn(batch, 3, resolution, resolution).to(memory_format=torch.channels_last)
        labels = torch.zeros(batch, dtype=torch.long)
        params = [p for p in net.parameters() if p.requires_grad]
        autocast = torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32)
        counter = TrafficCounter()
        with counter:
            if mode == "infer":
                with torch.inference_mode(), autocast:
                    net(x)
            else:
                with autocast:
                    loss = F.cross_entropy(net(x), labels)
                loss.backward()
                torch.optim.SGD(params, lr=0.01).step()
    c = counter.count
    return Traffic(provider, model, mode, batch, resolution, dtype, as_device, c.ops, c.bytes, c.rows), launches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdense traffic", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="densenet121", choices=sorted(MODELS))
    parser.add_argument("--providers", nargs="+", default=["torchvision-eager", "fastdense"])
    parser.add_argument("--mode", default="both", choices=[*MODES, "both"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="autocast dtype (float32: none)")
    parser.add_argument(
        "--as-device", default="cuda", choices=["cuda", "cpu"],
        help="whose operator choices fastdense's torch backend takes (default: a GPU's, what the count is for)",
    )  # fmt: skip
    parser.add_argument("--json", help="write every count to this JSON file")
    args = parser.parse_args(argv)
    unknown = [p for p in args.providers if p not in PROVIDERS or "compile" in p or "triton" in p]
    if unknown:
        parser.error(f"--providers: eager CPU providers only, got {unknown} (choices: {sorted(PROVIDERS)})")
    modes = MODES if args.mode == "both" else (args.mode,)
    results = [
        count_step(provider, args.model, mode, args.batch, args.resolution, args.dtype, args.as_device)
        for mode in modes
        for provider in args.providers
    ]
    print(f"{args.model}, batch {args.batch}, {args.resolution}^2, {args.dtype}, as on {args.as_device}: operators "
          "and GB read+written per step, counted on fake tensors (a count, not a time)")  # fmt: skip
    base = {r.mode: r for r in results if r.provider == args.providers[0]}
    for r in results:
        ratio = f" ({r.bytes / base[r.mode].bytes:.2f}x the bytes, {r.ops / base[r.mode].ops:.2f}x the operators)"
        line = f"{r.mode:5} {r.provider:30} {r.ops:7d} ops {r.bytes / 1e9:8.2f} GB"
        print(line + ("" if r is base[r.mode] else ratio))
        for row, (ops, nbytes) in r.rows.items():
            if ops:
                print(f"      {row:16} {ops:7d} ops {nbytes / 1e9:8.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
