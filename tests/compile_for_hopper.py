"""Compile every kernel variant fastdense launches for Hopper (sm_90) down to a cubin, with no GPU,
and read what the compiler made of it.

Run as a script without ``TRITON_INTERPRET`` (``tests/test_compile.py`` does): the interpreter never
compiles, so this is what catches code that only the real compiler rejects (types, layouts, constexpr
use). For each variant and autotuning configuration it reads the cubin's registers per thread, stack
bytes per thread (local memory: register spills) and shared memory (``cuobjdump -res-usage``, shipped
with Triton's NVIDIA backend), and whether the PTX multiplies with Hopper's ``wgmma`` (a ``tl.dot`` that
falls back to ``mma.sync`` does not). One table row per configuration; exits non-zero when any
configuration fails to build, spills, needs more shared memory than an H100/H200 block has, or does a
matrix product without wgmma.

Each kernel is compiled as a DenseNet launch specialises it (``ALIGNED_INTS``). ``--unaligned`` compiles
the same variants without those marks, as launches on other channel counts get them, and reports them
without failing: see ``UNALIGNED_NOTE``.

    PYTHONPATH=. python tests/compile_for_hopper.py [--all] [--unaligned] [--match TEXT]

``--match TEXT`` keeps the variants whose name contains TEXT (``--all --match ieee``: every float32
variant with TF32 off).
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastdense.kernels import (
    bn_relu_gemm,
    bn_relu_gemm_backward,
    bn_relu_pool,
    conv3x3,
    conv3x3_backward,
    finalize,
    stats,
)

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block on an H100/H200
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# The kernels whose inner loop is a tl.dot: each must become wgmma on Hopper.
MATMUL_KERNELS = ("bn_relu_gemm", "conv3x3", "dgrad", "wgrad", "conv3x3_dgrad", "conv3x3_wgrad")


@dataclass
class Resources:
    """What one compiled configuration uses, per thread (registers, stack) and per block (shared)."""

    registers: int
    stack: int  # bytes of local memory per thread: register spills
    shared: int  # bytes
    wgmma: int  # wgmma instructions in the PTX
    mma_sync: int  # pre-Hopper mma.sync instructions (a dot that did not become wgmma)


def resources(compiled) -> Resources:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage.stdout)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line: {usage.stdout!r}")
    registers, stack, _static_shared = map(int, found.groups())
    ptx = compiled.asm["ptx"]
    # Dynamic shared memory (Triton's pipeline buffers) is in the metadata, not in the cubin's static count.
    return Resources(registers, stack, compiled.metadata.shared, ptx.count("wgmma.mma_async"), ptx.count("mma.sync"))


def problems(name: str, used: Resources) -> list[str]:
    """Why a configuration is not fit for Hopper; empty when it is."""
    found = []
    if used.stack:
        found.append(f"spills ({used.stack} B of stack per thread)")
    if used.shared > SHARED_MEMORY_LIMIT:
        found.append(f"needs {used.shared} B of shared memory, over {SHARED_MEMORY_LIMIT} B")
    # Full-precision float32 products (TF32 off) have no tensor-core instruction: FMA loops, by design.
    needs_wgmma = name.split()[0] in MATMUL_KERNELS and "ieee" not in name.split()
    if needs_wgmma and (not used.wgmma or used.mma_sync):
        found.append(f"matrix product without wgmma ({used.wgmma} wgmma, {used.mma_sync} mma.sync)")
    return found


def _precisions(dtype: str, launcher) -> list[tuple[str, str]]:
    """(name suffix, PRECISION) of each product precision a launch in ``dtype`` can take: float32 follows
    the TF32 switch (``kernels.launch.dot_precision``), with its own configurations when it is off."""
    if dtype != "fp32" or "PRECISION" not in launcher.fn.arg_names:
        return [("", "tf32")]
    return [("", "tf32"), (" ieee", "ieee")]


def _launches(name: str, launcher, dtype: str, pointers: dict, flags: dict):
    pointers = {"counter_ptr": "i32"} | pointers  # the last programs' arrival counters (kernels.last_program)
    flags = {"BLOCK_T": stats.MERGE_ROWS} | flags if "BLOCK_T" in launcher.fn.arg_names else flags
    for suffix, precision in _precisions(dtype, launcher):
        if precision == "ieee" and (flags.get("PAIRED") or flags.get("STORE_DY")):
            continue  # layers are not paired in float32 with TF32 off (triton_ops.pairs_layers)
        for config in launcher.configs_for(precision):
            yield f"{name}{suffix}", launcher, pointers, flags | {"PRECISION": precision}, config


def variants():
    """(name, launcher, pointer dtypes, constexprs, config) for each launch fastdense can make. ``FROM_VAR``:
    a BatchNorm map from running statistics (eval), its rstd formed in the kernel."""
    conv = conv3x3._conv3x3_kernel
    gemm_flags = [(0, 0, 1, 0), (0, 1, 0, 1), (0, 0, 0, 0), (0, 0, 0, 1), (1, 0, 0, 0), (1, 0, 0, 1)]
    for dtype, (pool, epilogue, stat, from_var) in itertools.product(DTYPES, gemm_flags):
        gemm = bn_relu_gemm._pooled_gemm_kernel if pool else bn_relu_gemm._bn_relu_gemm_kernel
        flags = {"POOL": bool(pool), "EPILOGUE": bool(epilogue), "STATS": bool(stat), "FROM_VAR": bool(from_var)}
        pointers = {"x_ptr": dtype, "w_ptr": dtype, "y_ptr": dtype}
        yield from _launches(f"bn_relu_gemm {dtype} {flags}", gemm, dtype, pointers, flags)
    for (dtype, out), (prologue, dropout, stat, from_var) in itertools.product(
        [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32")],
        [(1, 0, 1, 0), (1, 1, 1, 0), (0, 0, 0, 0), (1, 0, 0, 1)],
    ):
        flags = {"PROLOGUE": bool(prologue), "DROPOUT": bool(dropout), "STATS": bool(stat), "FROM_VAR": bool(from_var)}
        pointers = {"y_ptr": dtype, "w_ptr": dtype, "noise_ptr": dtype, "out_ptr": out}
        yield from _launches(f"conv3x3 {dtype}->{out} {flags}", conv, dtype, pointers, flags)
    for dtype in DTYPES:
        yield from _launches(f"column_stats {dtype}", stats._column_stats_kernel, dtype, {"x_ptr": dtype}, {})
    for dtype, is_max, from_var in itertools.product(DTYPES, (True, False), (False, True)):
        kernel, pointers = bn_relu_pool._bn_relu_pool_kernel, {"x_ptr": dtype, "out_ptr": dtype}
        flags = {"IS_MAX": is_max, "FROM_VAR": from_var}
        yield from _launches(f"bn_relu_pool {dtype} max={is_max} from_var={from_var}", kernel, dtype, pointers, flags)


def backward_variants():
    dgrad, wgrad = bn_relu_gemm_backward._dgrad_kernel, bn_relu_gemm_backward._wgrad_kernel
    # Training (batch statistics, the block's sums) and eval, first to reach G or not, norm2's gradient formed in
    # the prologue (2-D blocks) or dY given (1-D and 3-D), and the launch's role: a layer alone, a pair's upper
    # layer over the lower's new columns (storing dY when it forms it), the pair's launch over their prefix.
    roles = {"alone": (False, False), "upper": (True, False), "pair": (False, True)}
    dgrad_flags = []
    for from_var, first, norm2, (store, paired) in itertools.product((0, 1), (0, 1), (1, 0), roles.values()):
        values = (from_var, first, not from_var, norm2, store and norm2, paired)
        names = ("FROM_VAR", "FIRST", "SUMS", "NORM2_GRAD", "STORE_DY", "PAIRED")
        dgrad_flags.append({name: bool(value) for name, value in zip(names, values, strict=True)})
    conv_dgrad, conv_wgrad = conv3x3_backward._conv3x3_dgrad_kernel, conv3x3_backward._conv3x3_wgrad_kernel
    for dtype in DTYPES:
        for flags in dgrad_flags:
            pointers = {"dy_ptr": dtype, "y2_ptr": dtype, "dy_out_ptr": dtype, "w_ptr": dtype, "x_ptr": dtype,
                        "du_ptr": dtype, "wu_ptr": dtype}  # fmt: skip
            yield from _launches(f"dgrad {dtype} {flags}", dgrad, dtype, pointers, flags)
        for from_var in (False, True):
            flags = {"FROM_VAR": from_var}
            pointers = {"d_ptr": dtype, "w_ptr": dtype, "y_ptr": dtype, "dp_ptr": dtype}
            yield from _launches(f"conv3x3_dgrad {dtype} {flags}", conv_dgrad, dtype, pointers, flags)
            pointers = {"d_ptr": dtype, "y_ptr": dtype}  # the weight's gradient in float32 (the parameter's)
            yield from _launches(f"conv3x3_wgrad {dtype} {flags}", conv_wgrad, dtype, pointers, flags)
        for from_var, norm2 in itertools.product((False, True), repeat=2):
            flags = {"FROM_VAR": from_var, "NORM2_GRAD": norm2}
            pointers = {"dy_ptr": dtype, "y2_ptr": dtype, "x_ptr": dtype}
            yield from _launches(f"wgrad {dtype} {flags}", wgrad, dtype, pointers, flags)
        for training, dropout in itertools.product((True, False), repeat=2):
            kernel, flags = finalize._finalize_kernel, {"TRAINING": training, "DROPOUT": dropout}
            pointers = {"x_ptr": dtype, "dout_ptr": dtype, "noise_ptr": dtype}
            yield from _launches(f"finalize {dtype} {flags}", kernel, dtype, pointers, flags)


# What Triton's launcher tells the compiler about a DenseNet-shaped launch: every pointer is 16-byte
# aligned (fresh allocations, and buffer column slices at multiples of 16 channels) and every channel
# count and row stride is a multiple of 16 (growth rates 32 and 48, 64 or 96 initial features), so it
# marks them divisible by 16, as it does for any such argument. Pixel counts and image sizes (M, H, W)
# get no such mark.
ALIGNED_INTS = {
    "N", "C", "K", "stride_x", "stride_y", "stride_out", "stride_g", "stride_dout", "stats_stride", "sums_stride",
    "grad_stride", "grad2_stride",
}  # fmt: skip


def divisibility(fn, aligned: bool) -> dict:
    if not aligned:
        return {}
    names = [p.name for p in fn.params if not p.is_constexpr and (p.name.endswith("_ptr") or p.name in ALIGNED_INTS)]
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in names}


def compile_variant(launcher, pointers, flags, config, aligned=True):
    fn = launcher.fn
    constexprs = {**flags, **config.kwargs}
    if "INTERPRETED" in fn.arg_names:
        constexprs["INTERPRETED"] = False
    if "PRECISION" not in fn.arg_names:
        constexprs.pop("PRECISION", None)
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature = {}
    for name in fn.arg_names:
        if name in constexpr_names:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
        elif "eps" in name or name == "inv_m":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    source = ASTSource(fn, signature, constexprs, divisibility(fn, aligned))
    return triton.compile(source, target=HOPPER, options=options)


# The quick set (CI): each kernel's main launches, first configuration. ``--all``: every variant and
# every autotuning configuration (several minutes on two cores).
QUICK = {
    "bn_relu_gemm bf16 {'POOL': False, 'EPILOGUE': False, 'STATS': True, 'FROM_VAR': False}",
    "bn_relu_gemm fp32 {'POOL': False, 'EPILOGUE': True, 'STATS': False, 'FROM_VAR': True}",
    "bn_relu_gemm bf16 {'POOL': True, 'EPILOGUE': False, 'STATS': False, 'FROM_VAR': True}",
    "conv3x3 bf16->bf16 {'PROLOGUE': True, 'DROPOUT': True, 'STATS': True, 'FROM_VAR': False}",
    "conv3x3 fp32->fp32 {'PROLOGUE': False, 'DROPOUT': False, 'STATS': False, 'FROM_VAR': False}",
    "column_stats bf16",
    "bn_relu_pool bf16 max=True from_var=False",
    "bn_relu_pool fp32 max=False from_var=True",
    "dgrad bf16 {'FROM_VAR': False, 'FIRST': False, 'SUMS': True, 'NORM2_GRAD': True, 'STORE_DY': False, "
    "'PAIRED': True}",
    "conv3x3_dgrad bf16 {'FROM_VAR': False}",
    "conv3x3_wgrad bf16 {'FROM_VAR': False}",
    "conv3x3_wgrad fp32 {'FROM_VAR': False} ieee",
    "wgrad bf16 {'FROM_VAR': False, 'NORM2_GRAD': True}",
    "finalize bf16 {'TRAINING': True, 'DROPOUT': True}",
    # float32 with TF32 off: the FMA products with their own configurations (once spilled 4-11 KB).
    "bn_relu_gemm fp32 {'POOL': False, 'EPILOGUE': False, 'STATS': True, 'FROM_VAR': False} ieee",
    "wgrad fp32 {'FROM_VAR': False, 'NORM2_GRAD': True} ieee",
}


# Without the marks (a channel count or row stride not a multiple of 16, e.g. growth rate 12), the
# compiler cannot vectorise a tile's loads and spreads its rows over more registers: several of the
# larger configurations spill there. Those launches are correct and slower; they are not DenseNet-121/
# 161/169/201/264's, so --unaligned reports them without failing.
UNALIGNED_NOTE = "unaligned launches (channel counts not multiples of 16): reported, not failed"


def main(argv: list[str]) -> int:
    everything, aligned = "--all" in argv, "--unaligned" not in argv
    match = argv[argv.index("--match") + 1] if "--match" in argv else ""
    failures, seen = 0, set()
    print(f"triton {triton.__version__}, target sm_{HOPPER.arch}; registers and stack per thread, shared per block")
    print("launches specialised as DenseNet's (16-aligned channel counts, row strides)" if aligned else UNALIGNED_NOTE)
    print(f"{'verdict':7} {'regs':>4} {'stack':>5} {'shared':>7} {'wgmma':>5} {'s':>5}  variant and configuration")
    for name, launcher, pointers, flags, config in itertools.chain(variants(), backward_variants()):
        if (not everything and (name not in QUICK or name in seen)) or match not in name:
            continue
        seen.add(name)
        label = f"{name} {config.kwargs} warps={config.num_warps} stages={config.num_stages}"
        start = time.perf_counter()
        try:
            used = resources(compile_variant(launcher, pointers, flags, config, aligned))
        except Exception as error:  # report every variant, then fail
            print(f"FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            failures += 1
            continue
        found = problems(name, used)
        failures += bool(found)
        verdict = "FAIL" if found else "ok"
        print(
            f"{verdict:7} {used.registers:4} {used.stack:5} {used.shared:7} {used.wgmma:5} "
            f"{time.perf_counter() - start:5.1f}  {label}" + (f": {'; '.join(found)}" if found else ""),
            flush=True,
        )
    print(f"{failures} failed")
    return 1 if failures and aligned else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
