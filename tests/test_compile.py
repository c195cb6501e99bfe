"""The kernels compile for Hopper (sm_90) with the real Triton compiler, down to a cubin, without a
GPU. The interpreter never compiles, so this is the CPU machines' check that the GPU path can run at
all (types, layouts, constexpr use, shared memory within an H100's limit). Each kernel's main
launches; ``python tests/compile_for_hopper.py --all`` compiles every variant and configuration."""

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
    assert result.stdout.count("ok  ") == 11, result.stdout
