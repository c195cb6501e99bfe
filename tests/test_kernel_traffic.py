"""The bytes each kernel launch moves, as its launcher's tile plan counts them (``Launch.moved``), against
what the kernel really loads and stores: under the Triton interpreter every ``tl.load`` and ``tl.store`` is
counted here (its unmasked elements times their size), for each kernel and mode on small odd shapes that
leave partial tiles. The plan is what ``python -m fastdense traffic`` counts for the triton backend."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from fastdense.kernels import (
    bn_relu_gemm,
    bn_relu_gemm_backward,
    bn_relu_pool,
    conv3x3,
    conv3x3_backward,
    finalize,
    stats,
)
from fastdense.kernels.launch import INTERPRET, LAUNCHERS, recording

from .test_kernels import norm_map, paired_case, randn

pytestmark = pytest.mark.skipif(not INTERPRET, reason="counts the interpreter's loads and stores")


@contextlib.contextmanager
def counted_memory():
    """Every interpreted ``tl.load`` and ``tl.store``: unmasked elements times the element size; and the
    addresses, for the bytes touched at least once (``unique``)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    moved = {"read": 0, "written": 0}
    launches = []  # per launch, the addresses it reads and writes (``new_launch`` starts the next)

    def size(ptrs, mask, kind) -> int:
        unmasked = np.broadcast_to(mask.data, ptrs.data.shape)
        element = ptrs.get_element_ty().primitive_bitwidth // 8
        if not launches:
            moved["new_launch"](None)
        launches[-1][kind].append((ptrs.data[unmasked].ravel(), element))
        return int(unmasked.sum()) * element

    def unique(touched) -> int:
        return sum(len(np.unique(np.concatenate([a for a, e in touched if e == element]))) * element
                   for element in {e for _, e in touched})  # fmt: skip

    moved["new_launch"] = lambda launch: launches.append({"read": [], "written": []})
    moved["unique"] = lambda: sum(unique(a["read"]) + unique(a["written"]) for a in launches)

    def counted_load(self, ptrs, mask, *args):
        moved["read"] += size(ptrs, mask, "read")
        return load(self, ptrs, mask, *args)

    def counted_store(self, ptrs, value, mask, *args):
        moved["written"] += size(ptrs, mask, "written")
        return store(self, ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield moved
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


def _gemm(**kwargs):
    pool = kwargs.pop("pool", False)
    rows = 3 * 10 * 9 if pool else 253
    x, weight = randn(rows, 70)[:, :67], randn(37, 67, seed=7)
    bn_relu_gemm.bn_relu_gemm(x, norm_map(67), weight, pool_hw=(10, 9) if pool else None, **kwargs)


def _conv(**kwargs):
    y, weight = randn(3 * 9 * 11, 40), randn(19, 40, 3, 3, seed=5)
    out = torch.empty(297, 23)[:, 2:21]
    if kwargs.pop("dropout", False):
        kwargs["noise"] = (randn(297, 19, seed=9) > 0).float() * 2
    conv3x3.conv3x3(y, weight, (3, 9, 11), out, **kwargs)


def _pool(window):
    bn_relu_pool.bn_relu_pool(randn(2, 37, 19, 23).contiguous(memory_format=torch.channels_last), norm_map(37),
                              *window)  # fmt: skip


def _backward(need_weight, rows=253):
    buf, grad_sum, sums = randn(rows, 70), randn(rows, 75, seed=25), randn(2, 67, seed=26)
    d_gamma, d_beta, d_weight = torch.empty(67), torch.empty(67), torch.empty(37, 67) if need_weight else None
    bn_relu_gemm_backward.norm1_gemm_backward(randn(rows, 37, seed=24), buf[:, :67], norm_map(67),
                                              randn(37, 67, seed=23), grad_sum, d_gamma=d_gamma, d_beta=d_beta,
                                              d_weight=d_weight, sums=sums)  # fmt: skip


def _conv_backward(from_var=False, need_weight=True, nhw=(3, 9, 11)):
    """The 3x3 conv's backward through norm2 (``conv3x3_dgrad``, ``conv3x3_wgrad``), then the 1x1's forming dY
    from what it left (dgrad storing it for wgrad)."""
    m = nhw[0] * nhw[1] * nhw[2]
    y, weight, d_new = randn(m, 40), randn(19, 40, 3, 3, seed=5), randn(m, 19, seed=6)
    d_gamma, d_beta, d_weight = torch.empty(40), torch.empty(40), torch.empty(19, 40, 3, 3) if need_weight else None
    norm2 = norm_map(40, from_var=from_var)
    d_pre, vectors = conv3x3_backward.conv3x3_norm2_backward(d_new, y, norm2, weight, nhw, d_gamma=d_gamma,
                                                             d_beta=d_beta, d_weight=d_weight)  # fmt: skip
    buf, grad_sum = randn(m, 70), randn(m, 75, seed=25)
    d_w1 = torch.empty(40, 67) if need_weight else None
    bn_relu_gemm_backward.norm1_gemm_backward(d_pre, buf[:, :67], norm_map(67), randn(40, 67, seed=23), grad_sum,
                                              d_gamma=torch.empty(67), d_beta=torch.empty(67), d_weight=d_w1,
                                              norm2_grad=(y, vectors))  # fmt: skip


def _paired(from_var, rows=253):
    """A pair's dgrad launch over the prefix both layers read, with the lower layer's weight gradient."""
    buf, norm_l, w_l, d_y_l, upper, _ = paired_case(rows, 67, 37, from_var=from_var)
    sums = None if from_var else randn(2, 67, seed=26)
    bn_relu_gemm_backward.norm1_gemm_backward(d_y_l, buf[:, :67], norm_l, w_l, randn(rows, 70, seed=25),
                                              d_gamma=torch.empty(67), d_beta=torch.empty(67),
                                              d_weight=torch.empty(37, 67), sums=sums, upper=upper)  # fmt: skip


def _finalize(training, dropout):
    g, x, d_out = randn(253, 50)[:, 3:40], randn(253, 45)[:, 5:42], randn(253, 40)[:, 1:38]
    out = torch.empty(253, 37)
    vectors = tuple(randn(37, seed=s).abs() + 0.5 for s in range(4)) if training else None
    noise = (randn(253, 37, seed=9) > 0).float() * 2 if dropout else None
    finalize.finalize(g, x, d_out, out, vectors, noise)


CASES = {
    "gemm-stats": lambda: _gemm(stats=torch.empty(3, 37)),
    "gemm-epilogue": lambda: _gemm(epilogue=norm_map(37, seed=11, from_var=True)),
    "gemm-plain": lambda: _gemm(),
    "gemm-pooled": lambda: _gemm(pool=True),
    "conv3x3-training": lambda: _conv(prologue=norm_map(40), stats=torch.empty(3, 19)),
    "conv3x3-dropout": lambda: _conv(prologue=norm_map(40), stats=torch.empty(3, 19), dropout=True),
    "conv3x3-eval": lambda: _conv(),
    "column-stats": lambda: stats.column_stats(randn(1100, 40)[:, 3:38]),
    "column-stats-merged-in-two-levels": lambda: stats.column_stats(randn(9000, 40)[:, 3:38]),
    "pool-stem-max": lambda: _pool((3, 2, 1, True)),
    "pool-transition-avg": lambda: _pool((2, 2, 0, False)),
    "pool-head-global": lambda: _pool(((19, 23), 19, 0, False)),
    "dgrad": lambda: _backward(False),
    "dgrad-and-wgrad": lambda: _backward(True),
    "dgrad-merged-in-two-levels": lambda: _backward(False, rows=1100),
    "conv3x3-backward": lambda: _conv_backward(),
    "conv3x3-backward-eval-no-weights": lambda: _conv_backward(from_var=True, need_weight=False),
    "conv3x3-backward-merged-in-two-levels": lambda: _conv_backward(need_weight=False, nhw=(2, 33, 35)),
    "dgrad-paired": lambda: _paired(False),
    "dgrad-paired-eval": lambda: _paired(True),
    "dgrad-paired-merged-in-two-levels": lambda: _paired(False, rows=2200),
    "finalize-training": lambda: _finalize(True, False),
    "finalize-training-dropout": lambda: _finalize(True, True),
    "finalize-eval": lambda: _finalize(False, False),
}


@pytest.mark.parametrize("case", CASES)
def test_the_tile_plan_counts_what_the_kernel_loads_and_stores(case):
    with counted_memory() as moved, recording(run=True) as launches:
        CASES[case]()
    planned = [launch.moved(LAUNCHERS[launch.kernel].interpret_config) for launch in launches]
    read, written = sum(p.read for p in planned), sum(p.written for p in planned)
    assert launches and moved["read"] > 0
    assert abs(read - moved["read"]) <= 0.05 * moved["read"], (read, moved)
    assert abs(written - moved["written"]) <= 0.05 * moved["written"], (written, moved)


@pytest.mark.parametrize("case", CASES)
def test_the_compulsory_bytes_are_what_the_kernel_touches_once(case):
    """``Moved.compulsory`` (what the roofline floors take): every element a launch reads, and every one it
    writes, once - the distinct addresses of its loads plus those of its stores, within 5%."""
    with counted_memory() as moved, recording(run=True, on_launch=moved["new_launch"]) as launches:
        CASES[case]()
    planned = [launch.moved(LAUNCHERS[launch.kernel].interpret_config) for launch in launches]
    compulsory, unique = sum(p.compulsory for p in planned), moved["unique"]()
    assert all(0 <= p.reread <= p.read for p in planned), planned
    assert abs(compulsory - unique) <= 0.05 * unique, (compulsory, unique, planned)
