"""How the kernels are launched: autotuned on a GPU, one fixed configuration otherwise.

``TRITON_INTERPRET=1`` (read by Triton when it is first imported) runs every program instance with
NumPy on CPU tensors. ``triton.autotune`` cannot run there (no GPU driver), so interpreted launches use
one small fixed configuration per kernel; compiled launches are autotuned. Two interpreter bugs
(triton 3.8) are worked around behind the kernels' ``INTERPRETED`` flag: ``tl.dot`` on bfloat16
operands returns garbage (operands are upcast to float32) and fp32 -> bf16 casts truncate instead of
rounding to nearest even (``kernels.affine.rounded`` rounds on the bits first).

Autotuning on a GPU is budgeted (``benchmarks/gpu_check.sh`` has minutes, not hours):

* keys take sizes rounded to powers of two (``bucket``), rows capped at ``ROW_BUCKET_CAP``, so a
  network's dozens of layer widths and every batch past a few share a handful of tuning runs;
* each trial is timed for ``TRIAL_WARMUP_MS`` + ``TRIAL_REPEAT_MS`` instead of Triton's 25 + 100 ms;
* results are kept on disk (Triton's ``cache_results``, under ``TRITON_CACHE_DIR``), so the processes of
  one benchmark tune each key once between them.

Once a key is tuned, a launch goes straight to the kernel with the configuration found (``Launcher``'s own
table, looked up by the key's argument values): no walk through Triton's autotuner on every call, which
costs host time a step of hundreds of launches cannot spare.

``FASTDENSE_AUTOTUNE=0`` launches compiled kernels with each kernel's first configuration (the one sized
for Hopper) instead of tuning; the interpreter always uses its own small one. float32 products in full
precision (``PRECISION="ieee"``: TF32 turned off) cannot use the tensor cores, so they run their own,
smaller configurations (``ieee=``): the TF32 ones spilled up to 11.6 KB per thread there.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language
import triton.testing

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# FASTDENSE_AUTOTUNE=0 launches compiled kernels with one fixed configuration: GPU tests over many small
# shapes then compile one variant per kernel instead of tuning every shape.
AUTOTUNE = not INTERPRET and os.environ.get("FASTDENSE_AUTOTUNE", "1") != "0"

# Past 2^16 rows a GEMM's 128-row tiles make 512 programs per column tile, about four waves over an
# H100/H200's 132 SMs: the configurations' ranking stops depending on the row count, so larger row
# counts share the key of 2^16 (and a batch past 64 at 224x224 retunes only its smaller blocks).
ROW_BUCKET_CAP = 2**16
# A trial's warm-up and timed repetitions (Triton's defaults: 25 and 100 ms): a kernel of 0.01-1 ms
# still repeats 20-2000 times, and a tuning run of five configurations costs ~0.15 s instead of ~0.65.
TRIAL_WARMUP_MS, TRIAL_REPEAT_MS = 5, 20


def _trial(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=TRIAL_WARMUP_MS, rep=TRIAL_REPEAT_MS, quantiles=quantiles)


@dataclass(frozen=True)
class Moved:
    """What one launch moves and computes, from its launcher's tile plan: bytes read from and written to
    global memory (every program's loads and stores, a K-loop re-reading A once per column tile; caches
    not counted), and FLOPs of its products (2 a multiply-add; elementwise work not counted). ``reread``:
    the part of ``read`` that reads again what the launch has read already (A once per column tile, a 3x3
    tap's neighbours, vectors per tile): traffic a cache may serve, so not in ``compulsory``, the bytes every
    launch moves however well its caches work (each element it touches read or written once)."""

    read: int
    written: int
    flops: int = 0
    reread: int = 0

    @property
    def bytes(self) -> int:
        return self.read + self.written

    def __add__(self, other: Moved) -> Moved:
        return Moved(self.read + other.read, self.written + other.written, self.flops + other.flops,
                     self.reread + other.reread)  # fmt: skip

    @property
    def compulsory(self) -> int:
        return self.bytes - self.reread


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a GPU would make it, recorded instead of run (``recording``)."""

    kernel: str  # the launcher's name
    args: dict  # every argument by name (tensors as passed, sizes, constexpr flags)
    key: tuple  # the autotuning key, formed as Triton's autotuner forms it
    configs: tuple  # the configurations the launch chooses among (one when it is not tuned)
    variant: tuple  # what a compiled binary is specialised on, besides its configuration (``_variant``)

    def moved(self, config: triton.Config | None = None) -> Moved:
        """Bytes and FLOPs of this launch with ``config`` (default: the first it chooses among, the one
        sized for Hopper; the autotuner may pick another: the read bytes depend on the tiles)."""
        return LAUNCHERS[self.kernel].plan(self.args, (config or self.configs[0]).kwargs)


LAUNCHERS: dict[str, Launcher] = {}  # by name: what a recorded launch's plan comes from
_recorded: list[Launch] | None = None
_recorded_run = False
_recorded_keep = True


_on_launch = None


@contextlib.contextmanager
def recording(run: bool = False, keep: bool = True, on_launch=None):
    """Record every launch (``Launch``, with the configurations a GPU would choose among) in the list this
    yields. ``run=False``: instead of running it (the counting tools run the triton backend on fake tensors,
    where nothing can launch; device checks pass meanwhile); ``run=True``: and run it. ``keep=False``: skip
    the launches without keeping them (a ``Launch`` holds its tensors: a memory count must not).
    ``on_launch``: called with each ``Launch`` as it is made (the traffic counter's stage rows)."""
    global _recorded, _recorded_run, _recorded_keep, _on_launch
    previous = (_recorded, _recorded_run, _recorded_keep, _on_launch)
    _recorded, _recorded_run, _recorded_keep, _on_launch = [], run, keep, on_launch
    try:
        yield _recorded
    finally:
        _recorded, _recorded_run, _recorded_keep, _on_launch = previous


class Launcher:
    """``launcher[grid](*args, **kwargs)`` runs one ``@triton.jit`` kernel with the configuration that
    fits: autotuned over ``configs`` (or ``ieee`` when ``PRECISION="ieee"``) on a GPU, the first of them
    with ``FASTDENSE_AUTOTUNE=0``, ``interpret`` under the interpreter, or the one ``forced`` sets."""

    def __init__(self, fn, configs, key, *, restore_value=None, interpret=None, ieee=None, name=None):
        self.fn, self.key = fn, list(key)
        # What tables and test ids call it: the kernel's name without its underscores and "_kernel".
        self.name = name or fn.__name__.strip("_").removesuffix("_kernel")
        self.configs = list(configs)
        self.ieee_configs = list(ieee) if ieee else self.configs
        self.interpret_config = interpret or self.configs[0]
        self._tuning = {"restore_value": restore_value}
        self._forced: triton.Config | None = None
        self.plan = None  # (arguments by name, a configuration's meta-parameters) -> Moved: ``planned``
        # The autotuner's choice per tuning key (``_tuning_key``): later launches of a key skip the autotuner.
        self._chosen: dict[tuple, triton.Config] = {}
        self._key_positions = [fn.arg_names.index(name) for name in self.key if name in fn.arg_names]
        LAUNCHERS[self.name] = self

    def planned(self, plan):
        """Decorator: ``plan`` gives what a launch moves (``Moved``) from its arguments and tiles."""
        self.plan = plan
        return plan

    def configs_for(self, precision: str | None) -> list[triton.Config]:
        """The configurations a launch with this ``PRECISION`` chooses among."""
        return self.ieee_configs if precision == "ieee" else self.configs

    @functools.cached_property
    def _autotuners(self) -> dict[bool, triton.runtime.Autotuner]:
        def autotuner(configs):
            return triton.autotune(configs, key=self.key, do_bench=_trial, cache_results=True, **self._tuning)(self.fn)

        tf32 = autotuner(self.configs)
        return {False: tf32, True: autotuner(self.ieee_configs) if self.ieee_configs is not self.configs else tf32}

    def config(self, precision: str | None) -> triton.Config | None:
        """The fixed configuration a launch uses, or None when it is autotuned."""
        if self._forced is not None:
            return self._forced
        if INTERPRET:
            return self.interpret_config
        return None if AUTOTUNE else self.configs_for(precision)[0]

    @contextlib.contextmanager
    def forced(self, config: triton.Config):
        """Launch with ``config`` (the tests run every configuration this way, under the interpreter too)."""
        previous, self._forced = self._forced, config
        try:
            yield
        finally:
            self._forced = previous

    def _record(self, args, kwargs) -> None:
        named = dict(zip(self.fn.arg_names, args, strict=False)) | kwargs  # positional first, then flags
        key = [named[k] for k in self.key if k in named] + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        precision = kwargs.get("PRECISION")
        tunes_on_gpu = os.environ.get("FASTDENSE_AUTOTUNE", "1") != "0"
        configs = self.configs_for(precision) if tunes_on_gpu else self.configs_for(precision)[:1]
        configs = tuple([self._forced] if self._forced else configs)
        launch = Launch(self.name, named, tuple(key), configs, self._variant(named))
        _recorded.append(launch)
        if _on_launch is not None:
            _on_launch(launch)

    def _variant(self, named: dict) -> tuple:
        """The compiled kernel's identity as Triton's launcher specialises it: each constexpr's value, each
        tensor's dtype, each integer as 1, a multiple of 16 or other (pointers counted 16-byte aligned)."""
        constexprs = _constexpr_names(self.fn)

        def kind(name, value):
            if name in constexprs:
                return value
            if hasattr(value, "dtype"):
                return str(value.dtype)
            if isinstance(value, bool) or not isinstance(value, int):
                return type(value).__name__
            return "1" if value == 1 else "16n" if value % 16 == 0 else "int"

        return tuple((name, kind(name, value)) for name, value in named.items())

    def _tuning_key(self, args, kwargs) -> tuple:
        """What a tuning result holds for: the key arguments' values (positional or by name) and every
        tensor's dtype, as Triton's autotuner keys its results."""
        values = [args[i] for i in self._key_positions if i < len(args)]
        values += [kwargs[name] for name in self.key if name in kwargs]
        dtypes = [a.dtype for a in args if hasattr(a, "dtype")]
        return (*values, *dtypes, kwargs.get("PRECISION"))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            precision = kwargs.get("PRECISION")
            if _recorded is not None:
                if _recorded_keep:
                    self._record(args, kwargs)
                if not _recorded_run:
                    return None
            config = self.config(precision)
            if config is None:
                key = self._tuning_key(args, kwargs)
                config = self._chosen.get(key)
                if config is None:  # the first launch of this key: tune it (or read Triton's cache of it)
                    tuner = self._autotuners[precision == "ieee"]
                    result = tuner[grid](*args, **kwargs)
                    self._chosen[key] = tuner.best_config
                    return result
            meta = config.kwargs
            resolved = grid(meta) if callable(grid) else grid
            return self.fn[resolved](*args, **kwargs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)

        return launch


def _constexpr_names(fn) -> set[str]:
    """The ``tl.constexpr`` parameters of a jitted kernel (or of the interpreter's wrapper of one)."""
    if hasattr(fn, "params"):
        return {p.name for p in fn.params if p.is_constexpr}
    import inspect

    parameters = inspect.signature(fn.fn).parameters.values()
    return {p.name for p in parameters if p.annotation in (triton.language.constexpr, "tl.constexpr")}


def tuned(
    configs: list[triton.Config],
    key: list[str],
    interpret: triton.Config | None = None,
    restore_value: list[str] | None = None,
    ieee: list[triton.Config] | None = None,
    name: str | None = None,
):
    """A ``Launcher`` for the decorated kernel (see its docstring). ``key``: the arguments a tuning result
    holds for; ``restore_value``: arguments a trial updates in place, put back after each trial (partial
    results need no reset: a launch's last programs merge only what that launch wrote, and leave their
    arrival counters at zero, ``kernels.last_program``)."""

    def wrap(kernel):
        return Launcher(
            kernel, configs, key, restore_value=restore_value, interpret=interpret, ieee=ieee, name=name,
        )  # fmt: skip

    return wrap


def uninitialised(*shape: int, device: torch.device) -> torch.Tensor:
    """A float32 array for partial results a launch writes only part of: uninitialised on a GPU (no
    zero-fill); NaN under the interpreter, so that a test reading a row no launch wrote fails (but not where
    launches are recorded without running: a count takes the step as a GPU runs it)."""
    if INTERPRET and (_recorded is None or _recorded_run):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: fp32 GEMMs follow cuDNN's TF32 switch,
    like the convolutions they replace (``torch.backends.cudnn.allow_tf32``, on by default)."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


# Set by ``fastdense.tools.stub_cuda.activate``: launches go through Triton's whole launch path to a stub CUDA
# driver that runs nothing, so CPU tensors' pointers are passed as device ones (host-time measurement only).
STUB_DRIVER = False


def check_kernel_tensors(*tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET and not STUB_DRIVER and (_recorded is None or _recorded_run):
            raise RuntimeError(
                f"fastdense Triton kernels need CUDA tensors (got a {t.device} tensor); on the CPU they run only "
                "under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )


# Row (pixel) indices are int32 inside the kernels (kernels/offsets.py); the margin leaves room for a
# tile hanging over the last row and a 3x3 tap reaching one image row further.
MAX_ROWS = 2**31 - 2**20


def check_rows(rows: int, what: str) -> None:
    """Refuse a launch whose row count (pixels, N * H * W) int32 indices cannot address."""
    if rows > MAX_ROWS:
        raise ValueError(
            f"{what}: {rows} rows (N * H * W pixels) is more than the {MAX_ROWS} the kernels index; "
            "split the batch (or use backend='torch')"
        )


# Host-side integer helpers in plain Python: Triton's own (``triton.cdiv``, ``triton.next_power_of_2``) are
# constexpr functions in Triton 3.8, whose call wrapper costs a few microseconds each, and a launch's
# grid and buffer sizes call them several times.
def cdiv(a: int, b: int) -> int:
    """``a / b`` rounded up (a grid's tile count)."""
    return -(-a // b)


# A split-M weight gradient's programs each write a float32 partial of the whole gradient tile they own,
# read back by the merge: a split covers at least this many rows (on a GPU; the interpreter's configurations
# take 16, so that tests reach several splits), so that the partials cost a fraction of what the split reads
# (a 3x3 conv's 9 * 32 * 128 float32 partial, written and read, weighs what ~900 of its rows do).
SPLIT_ROWS = 2048


def split_config(meta: dict, num_warps: int, num_stages: int) -> triton.Config:
    """A split-M launch's configuration on a GPU: ``meta`` with ``SPLIT_ROWS``."""
    return triton.Config(meta | {"SPLIT_ROWS": SPLIT_ROWS}, num_warps=num_warps, num_stages=num_stages)


def split_count(m: int, meta: dict) -> int:
    """The splits of a split-M launch over ``m`` rows: ``SPLIT_M``, or fewer where a split would cover fewer
    than ``SPLIT_ROWS`` rows."""
    return max(1, min(meta["SPLIT_M"], cdiv(m, meta["SPLIT_ROWS"])))


def bucket(n: int) -> int:
    """A size rounded up to a power of two: autotuning keys on it (``*_BUCKET`` kernel arguments), so a
    network's dozens of layer widths share a few tuning runs instead of one each."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def row_bucket(m: int) -> int:
    """A row count's tuning key: ``bucket(m)``, at most ``ROW_BUCKET_CAP``."""
    return min(bucket(m), ROW_BUCKET_CAP)


def smallest(configs: list[triton.Config], *names: str) -> int:
    """The smallest product of the meta-parameters ``names`` over ``configs`` (e.g. rows per program),
    which sizes the per-program partial-statistics arrays for any configuration the tuner picks."""
    return min(math.prod(c.kwargs[n] for n in names) for c in configs)


def unit_columns(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor's columns are adjacent in memory (rows may have any stride). A single
    column counts whatever its stride: the kernels never step across columns then."""
    return t.shape[1] <= 1 or t.stride(1) == 1
