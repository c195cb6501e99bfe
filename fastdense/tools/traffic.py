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

A launch is what a GPU runs: one per ATen operator, except PyTorch's multi-tensor operators
(``torch._foreach_*``: the optimizer's update, running statistics), which launch one kernel per group of
tensors and chunks as ``multi_tensor_apply`` forms them on CUDA (``foreach_launches``), and one per Triton
kernel launch. The training step's optimizer is SGD as PyTorch runs it on CUDA by default (``foreach``) for
every provider alike.

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
from torch.utils.flop_counter import flop_registry

from fastdense import stages
from fastdense.block_op import OPENED
from fastdense.devices import counted_as

from .measure import DTYPES, MODES
from .providers import MODELS, PROVIDERS
from .roofline import CARDS, LAUNCH_SECONDS, card_peaks

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
    "aten._unsafe_view.default", "aten.as_strided_.default",  # aliases that reach the counter as operators
}  # fmt: skip

# PyTorch's multi_tensor_apply on CUDA (ATen/native/cuda/MultiTensorApply.cuh, with the 32 KB kernel arguments
# of CUDA >= 12.1 on Volta and later): a launch takes at most this many tensors per list depth (the lists an
# operator reads and writes), or this many chunks of ``FOREACH_CHUNK`` elements, whichever fills first.
FOREACH_MAX_TENSORS = {1: 770, 2: 448, 3: 336, 4: 252, 5: 210}
FOREACH_MAX_CHUNKS, FOREACH_CHUNK = 2240, 65536


def foreach_launches(numels: list[int], depth: int) -> int:
    """The kernel launches of one ``torch._foreach_*`` operator over tensors of ``numels`` elements with
    ``depth`` tensor lists, as ``multi_tensor_apply`` groups them (empty tensors skipped)."""
    max_tensors = FOREACH_MAX_TENSORS[min(max(depth, 1), 5)]
    launches = tensors = chunks_in_launch = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = -(-numel // FOREACH_CHUNK)
        for chunk in range(chunks):
            chunks_in_launch += 1
            if (tensors == max_tensors and chunk == chunks - 1) or chunks_in_launch == FOREACH_MAX_CHUNKS:
                launches, chunks_in_launch = launches + 1, 0
                tensors = 0 if chunk == chunks - 1 else 1  # a tensor cut mid-way starts the next launch
    return launches + (chunks_in_launch > 0)


def _launches_of(func, args, results) -> int:
    """How many kernels an ATen operator launches on a GPU: one, or ``foreach_launches`` for a multi-tensor
    operator (its tensor lists, and the list it returns when it is not in place)."""
    if not func.__name__.startswith("_foreach_"):
        return 1
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    depth = len(lists) + (1 if results else 0)
    return foreach_launches([t.numel() for t in lists[0]], depth) if lists else 1


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
    """Launches (PyTorch operators' kernels and Triton kernels), bytes moved and FLOPs, in total and per
    breakdown row (``[launches, bytes, flops, Triton kernel launches, compulsory bytes]``), and each card's
    roofline floor: per operator or kernel the larger of its FLOPs over the card's matmul rate and its
    compulsory bytes over the card's bandwidth, plus the cost of each launch. An ATen operator's bytes are
    all compulsory (its inputs and outputs once); a kernel's tile plan also counts what its programs read
    again (``kernels.launch.Moved``), which a cache may serve: a floor must not count it."""

    half_precision: bool = True
    launches: int = 0
    bytes: int = 0
    flops: int = 0
    kernels: int = 0
    compulsory: int = 0
    rows: dict[str, list[int]] = field(default_factory=lambda: {row: [0, 0, 0, 0, 0] for row in ROWS})
    floors: dict[str, float] = field(default_factory=dict)

    def add(
        self, row: str, nbytes: int, flops: int = 0, kernel: bool = False, compulsory: int | None = None,
        launches: int = 1,
    ) -> None:  # fmt: skip
        compulsory = nbytes if compulsory is None else compulsory
        self.launches += launches
        self.bytes += nbytes
        self.flops += flops
        self.kernels += kernel
        self.compulsory += compulsory
        for i, value in enumerate((launches, nbytes, flops, int(kernel), compulsory)):
            self.rows[row][i] += value
        for card in CARDS:
            peaks = card_peaks(card, self.half_precision)
            if peaks is not None:
                seconds = max(flops / peaks[0], compulsory / peaks[1]) + launches * LAUNCH_SECONDS
                self.floors[card] = self.floors.get(card, 0.0) + seconds


class TrafficCounter(TorchDispatchMode):
    """Counts every ATen operator run under it (use above a ``FakeTensorMode``: nothing is computed), and
    every Triton kernel launch ``on_launch`` reports (``kernels.launch.recording``), with its FLOPs."""

    fastdense_counter = True  # observed.OWN_COUNTER: the fused parts run fused under it, as on a GPU

    def __init__(self, half_precision: bool = True) -> None:
        super().__init__()
        self.count = Count(half_precision)
        self.by_operator: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def on_launch(self, launch) -> None:
        """A Triton kernel launch: one row, its bytes and FLOPs from its launcher's tile plan."""
        moved = launch.moved()
        self.count.add(self._stage_row() or "other", moved.bytes, moved.flops, kernel=True, compulsory=moved.compulsory)
        name = f"triton.{launch.kernel}"
        self.by_operator[name][0] += 1
        self.by_operator[name][1] += moved.bytes

    @staticmethod
    def _stage_row() -> str | None:
        active = [STAGE_ROWS[s] for s in stages.ACTIVE if s in STAGE_ROWS]
        return active[-1] if active else None

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
        if not results:  # an in-place multi-tensor operator returns nothing: it writes its first list
            results = [t for t in tree_leaves(_mutated(func, args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.is_view or name in FREE or not results:  # views, allocations, metadata queries
            return out
        written_only = {a.name for a in func._schema.arguments if a.is_out}  # out=: written, not read
        read = (args, {name: value for name, value in kwargs.items() if name not in written_only})
        nbytes = _bytes(tree_leaves(read)) + _bytes(results)
        formula = flop_registry.get(func._overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        launches = _launches_of(func, args, out)
        self.count.add(self._stage_row() or _row_of(func, args), nbytes, flops, launches=launches)
        self.by_operator[name][0] += launches
        self.by_operator[name][1] += nbytes
        return out


def _mutated(func, args, kwargs) -> list:
    """The arguments an operator writes in place (its schema's mutable arguments)."""
    named = dict(zip((a.name for a in func._schema.arguments), args, strict=False)) | kwargs
    return [named[a.name] for a in func._schema.arguments if a.alias_info and a.alias_info.is_write and a.name in named]


@dataclass
class Traffic:
    provider: str
    model: str
    mode: str
    batch: int
    resolution: int
    dtype: str
    as_device: str
    launches: int  # every kernel launch of the step: PyTorch operators' and Triton kernels
    bytes: int
    rows: dict[str, list[int]]  # [launches, bytes, flops, Triton kernel launches, compulsory bytes] per row
    kernels: int = 0  # of the launches, Triton kernels (the triton backend's)
    operators: int = 0  # of the launches, PyTorch operators' kernels
    flops: int = 0
    compulsory_bytes: int = 0  # ``bytes`` less what kernels read again (a cache may serve it): the floors'
    floors: dict[str, float] = field(default_factory=dict)  # seconds per named card: a floor, never a time
    by_operator: dict[str, list[int]] = field(default_factory=dict)  # name -> [launches, bytes], most first
    note: str = "a count of launches, bytes read and written, and FLOPs, with roofline floors: not a time"


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
    counter = TrafficCounter(half_precision=compute != torch.float32)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, counted_as(as_device), recording(on_launch=counter.on_launch) as launches:
        net = PROVIDERS[provider].build(model).train(mode == "train")
        x = torch.randn(batch, 3, resolution, resolution).to(memory_format=torch.channels_last)
        labels = torch.zeros(batch, dtype=torch.long)
        params = [p for p in net.parameters() if p.requires_grad]
        autocast = torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32)
        with counter:
            if mode == "infer":
                with torch.inference_mode(), autocast:
                    net(x)
            else:
                with autocast:
                    loss = F.cross_entropy(net(x), labels)
                loss.backward()
                torch.optim.SGD(params, lr=0.01, foreach=True).step()  # as on CUDA by default
    c = counter.count
    tally = dict(sorted(((name, list(v)) for name, v in counter.by_operator.items()), key=lambda kv: -kv[1][0]))
    traffic = Traffic(provider, model, mode, batch, resolution, dtype, as_device, c.launches, c.bytes, c.rows,
                      c.kernels, c.launches - c.kernels, c.flops, c.compulsory, c.floors, tally)  # fmt: skip
    return traffic, launches


def main(argv: list[str] | None = None) -> None:
    from . import describe

    parser = argparse.ArgumentParser(prog="python -m fastdense traffic", description=describe(__doc__))
    parser.add_argument("--model", default="densenet121", choices=sorted(MODELS))
    parser.add_argument("--providers", nargs="+", default=["torchvision-eager", "fastdense"])
    parser.add_argument("--mode", default="both", choices=[*MODES, "both"])
    parser.add_argument("--batch", type=int, nargs="+", default=[64], help="one count per batch size")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="autocast dtype (float32: none)")
    parser.add_argument(
        "--as-device", default="cuda", choices=["cuda", "cpu"],
        help="whose operator choices fastdense's torch backend takes (default: a GPU's, what the count is for)",
    )  # fmt: skip
    parser.add_argument("--by-operator", action="store_true", help="also list each count's launches by operator")
    parser.add_argument("--json", help="write every count to this JSON file (with the tally by operator)")
    args = parser.parse_args(argv)
    unknown = [p for p in args.providers if p not in PROVIDERS or "compile" in p]
    if unknown:
        parser.error(f"--providers: eager providers only, got {unknown} (choices: {sorted(PROVIDERS)})")
    modes = MODES if args.mode == "both" else (args.mode,)
    results = [
        count_step(provider, args.model, mode, batch, args.resolution, args.dtype, args.as_device)
        for batch in args.batch
        for mode in modes
        for provider in args.providers
    ]
    batches = ", ".join(map(str, args.batch))
    print(f"{args.model}, batch {batches}, {args.resolution}^2, {args.dtype}, as on {args.as_device}: launches "
          "(PyTorch operators' kernels and Triton kernels; SGD as on CUDA, foreach), GB read+written (all loads "
          "and stores; in brackets the compulsory "
          "part, without what kernels read again) and GFLOPs per step, counted on fake tensors; roofline floors "
          f"in ms (a floor, never a time: compulsory bytes, {LAUNCH_SECONDS * 1e6:.0f} us a launch)")  # fmt: skip
    base = {(r.mode, r.batch): r for r in results if r.provider == args.providers[0]}
    for r in results:
        b = base[r.mode, r.batch]
        compulsory = r.compulsory_bytes / b.compulsory_bytes
        ratio = "" if r is b else (f" ({r.bytes / b.bytes:.2f}x the bytes [{compulsory:.2f}x]"
                                   f", {r.launches / b.launches:.2f}x the launches)")  # fmt: skip
        kernels = f" ({r.kernels} Triton kernels + {r.operators} PyTorch)" if r.kernels else ""
        batch = f" b{r.batch}" if len(args.batch) > 1 else ""
        print(f"{r.mode:5}{batch} {r.provider:34} {r.launches:6d} launches{kernels}, {r.bytes / 1e9:6.2f} GB "
              f"[{r.compulsory_bytes / 1e9:.2f}], {r.flops / 1e9:5.0f} GFLOPs{ratio}")  # fmt: skip
        print("      floors: " + ", ".join(f"{card} {seconds * 1e3:.1f}" for card, seconds in r.floors.items()))
        for row, (ops, nbytes, flops, launches, compulsory) in r.rows.items():
            if ops:
                triton = f" ({launches} Triton)" if launches else ""
                print(f"      {row:16} {ops:6d} launches{triton:14} {nbytes / 1e9:6.2f} GB [{compulsory / 1e9:5.2f}] "
                      f"{flops / 1e9:5.0f} GFLOPs")  # fmt: skip
        if args.by_operator:
            print("      by operator (launches, GB):")
            for name, (count, nbytes) in r.by_operator.items():
                print(f"        {count:6d} {nbytes / 1e9:7.2f}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
