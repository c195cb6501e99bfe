"""Compile every kernel variant fastdense launches for Hopper (sm_90) down to a cubin, with no GPU.

Run as a script without ``TRITON_INTERPRET`` (``tests/test_compile.py`` does): the interpreter never
compiles, so this is what catches code that only the real compiler rejects (types, layouts, constexpr
use, shared memory over the limit). Prints one line per variant; exits non-zero on any failure.
"""

from __future__ import annotations

import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import bn_relu_gemm, bn_relu_gemm_backward, bn_relu_pool, conv3x3, finalize, stats

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block on an H100/H200
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def variants():
    """(name, autotuner, pointer dtypes, constexprs, config) for each launch fastdense can make."""
    gemm, conv = bn_relu_gemm._bn_relu_gemm_kernel, conv3x3._conv3x3_kernel
    for dtype, (pool, epilogue, stat) in itertools.product(DTYPES, [(0, 0, 1), (0, 1, 0), (0, 0, 0), (1, 0, 0)]):
        for config in gemm.configs:
            flags = {"POOL": bool(pool), "EPILOGUE": bool(epilogue), "STATS": bool(stat)}
            yield f"bn_relu_gemm {dtype} {flags}", gemm, {"x_ptr": dtype, "w_ptr": dtype, "y_ptr": dtype}, flags, config
    for (dtype, out), (prologue, dropout, stat) in itertools.product(
        [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32")],
        [(1, 0, 1), (1, 1, 1), (0, 0, 0), (1, 0, 0)],
    ):
        for config in conv.configs:
            flags = {"PROLOGUE": bool(prologue), "DROPOUT": bool(dropout), "STATS": bool(stat)}
            pointers = {"y_ptr": dtype, "w_ptr": dtype, "noise_ptr": dtype, "out_ptr": out}
            yield f"conv3x3 {dtype}->{out} {flags}", conv, pointers, flags, config
    for dtype, config in itertools.product(DTYPES, stats._column_stats_kernel.configs):
        yield f"column_stats {dtype}", stats._column_stats_kernel, {"x_ptr": dtype}, {}, config
    for dtype, is_max in itertools.product(DTYPES, (True, False)):
        kernel, pointers = bn_relu_pool._bn_relu_pool_kernel, {"x_ptr": dtype, "out_ptr": dtype}
        for config in kernel.configs:
            yield f"bn_relu_pool {dtype} max={is_max}", kernel, pointers, {"IS_MAX": is_max}, config


def backward_variants():
    dgrad, wgrad = bn_relu_gemm_backward._dgrad_kernel, bn_relu_gemm_backward._wgrad_kernel
    for dtype in DTYPES:
        for config in dgrad.configs:
            yield f"dgrad {dtype}", dgrad, {"dy_ptr": dtype, "w_ptr": dtype, "x_ptr": dtype}, {}, config
        for config in wgrad.configs:
            yield f"wgrad {dtype}", wgrad, {"dy_ptr": dtype, "x_ptr": dtype}, {}, config
        for training, dropout in itertools.product((True, False), repeat=2):
            kernel, flags = finalize._finalize_kernel, {"TRAINING": training, "DROPOUT": dropout}
            pointers = {"x_ptr": dtype, "dout_ptr": dtype, "noise_ptr": dtype}
            for config in kernel.configs:
                yield f"finalize {dtype} {flags}", kernel, pointers, flags, config


def compile_variant(autotuner, pointers, flags, config):
    fn = autotuner.fn
    constexprs = {**flags, **config.kwargs}
    if "INTERPRETED" in fn.arg_names:
        constexprs["INTERPRETED"] = False
    if "PRECISION" in fn.arg_names:
        constexprs["PRECISION"] = "tf32"
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature = {}
    for name in fn.arg_names:
        if name in constexpr_names:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
        else:
            signature[name] = "i32"
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(ASTSource(fn, signature, constexprs), target=HOPPER, options=options)


# The quick set (CI): each kernel's main launches, first configuration. ``--all``: every variant and
# every autotuning configuration (several minutes on two cores).
QUICK = {
    "bn_relu_gemm bf16 {'POOL': False, 'EPILOGUE': False, 'STATS': True}",
    "bn_relu_gemm fp32 {'POOL': False, 'EPILOGUE': True, 'STATS': False}",
    "bn_relu_gemm bf16 {'POOL': True, 'EPILOGUE': False, 'STATS': False}",
    "conv3x3 bf16->bf16 {'PROLOGUE': True, 'DROPOUT': True, 'STATS': True}",
    "conv3x3 fp32->fp32 {'PROLOGUE': False, 'DROPOUT': False, 'STATS': False}",
    "column_stats bf16",
    "bn_relu_pool bf16 max=True",
    "bn_relu_pool fp32 max=False",
    "dgrad bf16",
    "wgrad bf16",
    "finalize bf16 {'TRAINING': True, 'DROPOUT': True}",
}


def main(argv: list[str]) -> int:
    everything = "--all" in argv
    failures, seen = 0, set()
    fits: dict[str, bool] = {}
    for name, autotuner, pointers, flags, config in itertools.chain(variants(), backward_variants()):
        if not everything and (name not in QUICK or name in seen):
            continue
        seen.add(name)
        label = f"{name} {config.kwargs} warps={config.num_warps} stages={config.num_stages}"
        start = time.perf_counter()
        try:
            compiled = compile_variant(autotuner, pointers, flags, config)
        except Exception as error:  # report every variant, then fail
            print(f"FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            failures += 1
            continue
        shared = compiled.metadata.shared
        fits[name] = fits.get(name, False) or shared <= SHARED_MEMORY_LIMIT
        # Over the shared-memory limit the autotuner skips a configuration (OutOfResources); a variant
        # fails only if none of its configurations fits.
        verdict = "ok  " if shared <= SHARED_MEMORY_LIMIT else "over"
        print(f"{verdict} {label}: shared memory {shared} B, {time.perf_counter() - start:.1f} s", flush=True)
    unfit = [name for name, fit in fits.items() if not fit]
    for name in unfit:
        print(f"FAIL {name}: no configuration fits in {SHARED_MEMORY_LIMIT} B of shared memory")
    failures += len(unfit)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
