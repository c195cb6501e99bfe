"""The kernels compile for Hopper (sm_90) with the real Triton compiler, down to a cubin, without a
GPU. The interpreter never compiles, so this is the CPU machines' check that the GPU path can run at
all (types, layouts, constexpr use), and reads what the compiler made: no register spills, shared memory
within an H100's limit, wgmma in every matrix product. Each kernel's main launches;
``python tests/compile_for_hopper.py --all`` compiles every variant and configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_hopper(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}  # compile now, not from a cache
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "compile_for_hopper.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(rows) == 16, result.stdout  # one row per name in compile_for_hopper.QUICK
    assert sum("ieee" in row for row in rows) == 3, result.stdout
    for _verdict, registers, stack, shared, wgmma, _seconds, kernel, *_rest in rows:
        assert 0 < int(registers) <= 255 and int(stack) == 0 and int(shared) <= 227 * 1024, result.stdout
        ieee = "ieee" in _rest  # float32 with TF32 off multiplies on the FMA units, without wgmma
        assert int(wgmma) > 0 or ieee or kernel not in ("bn_relu_gemm", "conv3x3", "dgrad", "wgrad"), result.stdout


def test_the_check_fails_spills_shared_memory_and_products_without_wgmma():
    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import compile_for_hopper as check
    finally:
        sys.path.remove(str(ROOT / "tests"))
    fine = check.Resources(registers=200, stack=0, shared=100_000, wgmma=8, mma_sync=0)
    assert check.problems("conv3x3 bf16->bf16 {}", fine) == []
    assert check.problems("conv3x3 bf16->bf16 {}", fine.__class__(255, 8, 100_000, 8, 0))  # spills
    assert check.problems("bn_relu_gemm fp32 {}", fine.__class__(200, 0, 232_449, 8, 0))  # over 227 KB
    assert check.problems("dgrad bf16", fine.__class__(200, 0, 1000, 0, 4))  # mma.sync, no wgmma
    assert check.problems("wgrad bf16", fine.__class__(200, 0, 1000, 8, 2))  # part of it without wgmma
    assert check.problems("bn_relu_pool bf16 max=True", fine.__class__(96, 0, 0, 0, 0)) == []  # no product
    assert check.problems("wgrad fp32 ieee", fine.__class__(200, 0, 1000, 0, 0)) == []  # FMA, by design
    assert check.problems("wgrad fp32 ieee", fine.__class__(255, 8, 1000, 0, 0))  # but it may not spill
