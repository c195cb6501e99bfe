"""Every configuration the autotuner may pick computes the right answer.

On a GPU the autotuner chooses among each kernel's configurations (``configs``, and ``ieee_configs`` for
float32 products with TF32 off); the interpreter otherwise runs one small configuration only. Here each
kernel runs with each of its configurations in turn (``Launcher.forced``), on odd shapes that leave a
partial tile in every dimension of every configuration (rows, output columns, the reduction), against
its PyTorch reference. All of them, every run. The
kernels that merge their partial results in their last programs (``kernels.last_program``) do it for every
configuration's tiles.
"""

from __future__ import annotations

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
from fastdense.tools.verify import relative_error

from .test_kernels import assert_statistics, norm_map, paired_case, randn, statistics_view

# No power of two divides these: every tiling leaves a partial last tile, and most leave several tiles.
M, N, K = 253, 131, 133
TOL = 1e-5  # float32, fp32 accumulation; only the summation order differs from the reference


def _every_config(*launchers):
    cases = []
    for launcher in launchers:
        configs = launcher.configs + [c for c in launcher.ieee_configs if c not in launcher.configs]
        cases += [pytest.param(launcher, c, id=f"{launcher.name}-{i}") for i, c in enumerate(configs)]
    return cases


def _gemm_case():
    buf = randn(M, K + 3)
    x, norm, weight = buf[:, :K], norm_map(K), randn(N, K, seed=7) * 0.1
    stats_out = statistics_view(N)
    y = bn_relu_gemm.bn_relu_gemm(x, norm, weight, stats=stats_out, stats_eps=1e-5)
    assert relative_error(y, bn_relu_gemm.bn_relu_gemm_reference(x, norm, weight)) <= TOL
    assert_statistics(stats_out, y, 1e-5)
    epilogue = norm_map(N, seed=11, from_var=True)
    y = bn_relu_gemm.bn_relu_gemm(x, norm, weight, epilogue=epilogue)
    assert relative_error(y, bn_relu_gemm.bn_relu_gemm_reference(x, norm, weight, epilogue=epilogue)) <= TOL


def _pooled_gemm_case():
    hw = (22, 19)  # 11 x 9 pooled pixels per image, 297 output rows
    x, norm, weight = randn(3 * 22 * 19, K), norm_map(K, from_var=True), randn(N, K, seed=7) * 0.1
    y = bn_relu_gemm.bn_relu_gemm(x, norm, weight, pool_hw=hw)
    assert relative_error(y, bn_relu_gemm.bn_relu_gemm_reference(x, norm, weight, pool_hw=hw)) <= TOL


def _conv3x3_case():
    nhw, c, k = (3, 9, 11), 67, 37  # 297 rows; channels leave a partial K step; 37 new channels
    m = nhw[0] * nhw[1] * nhw[2]
    y, weight, prologue = randn(m, c), randn(k, c, 3, 3, seed=5) * 0.1, norm_map(c)
    out = torch.zeros(m, k + 3, device=y.device)
    stats_out = statistics_view(k)
    conv3x3.conv3x3(y, weight, nhw, out[:, 1 : 1 + k], prologue=prologue, stats=stats_out, stats_eps=1e-5)
    expected = conv3x3.conv3x3_reference(y, weight, nhw, prologue=prologue)
    assert relative_error(out[:, 1 : 1 + k], expected) <= TOL
    assert_statistics(stats_out, expected, 1e-5)


def _column_stats_case():
    cols = randn(1100, N + 4, scale=3.0, offset=50.0)[:, 2 : 2 + N]  # rows past one program's 1024
    assert_statistics(stats.column_stats(cols, 1e-5), cols, 1e-5)


def _bn_relu_pool_case():
    x = randn(2, N, 19, 23).contiguous(memory_format=torch.channels_last)
    for window, norm in (((3, 2, 1, True), norm_map(N)), ((2, 2, 0, False), norm_map(N, from_var=True))):
        out = bn_relu_pool.bn_relu_pool(x, norm, *window)  # the stem's max pool, a transition's average
        assert relative_error(out, bn_relu_pool.bn_relu_pool_reference(x, norm, *window)) <= TOL


def _norm1_backward_case():
    c, k = N, K  # dgrad: M x C output tiles over a K-long reduction; wgrad: K x C tiles over M rows
    buf = randn(M, c + 3)
    x, norm = buf[:, :c], norm_map(c)
    weight, d_y = randn(k, c, seed=23), randn(M, k, seed=24)
    grad_sum, sums = randn(M, c + 5, seed=25), randn(2, c, seed=26)
    expected_sum, expected_sums = grad_sum.clone(), sums.clone()
    got = [torch.empty(shape, device=x.device) for shape in (c, c, (k, c))]
    bn_relu_gemm_backward.norm1_gemm_backward(d_y, x, norm, weight, grad_sum, d_gamma=got[0], d_beta=got[1],
                                              d_weight=got[2], sums=sums)  # fmt: skip
    want = bn_relu_gemm_backward.norm1_gemm_backward_reference(d_y, x, norm, weight, expected_sum, True,
                                                               sums=expected_sums)  # fmt: skip
    assert relative_error(grad_sum, expected_sum) <= TOL and relative_error(sums, expected_sums) <= TOL
    for name, a, b in zip(("d_gamma", "d_beta", "dW"), got, want, strict=True):
        assert relative_error(a, b) <= TOL, name


def _conv3x3_backward_case():
    nhw, c, k = (3, 9, 11), N, 37  # 297 rows; 131 bottleneck channels; the reduction 9 * 37 long
    m = nhw[0] * nhw[1] * nhw[2]
    y, norm2, weight, d_new = randn(m, c), norm_map(c), randn(k, c, 3, 3, seed=5) * 0.1, randn(m, k, seed=6)
    got = [torch.empty(shape, device=y.device) for shape in (c, c, (k, c, 3, 3))]
    d_pre, vectors = conv3x3_backward.conv3x3_norm2_backward(d_new, y, norm2, weight, nhw, d_gamma=got[0],
                                                             d_beta=got[1], d_weight=got[2])  # fmt: skip
    want_dp, want_dy, *want = conv3x3_backward.conv3x3_norm2_backward_reference(d_new, y, norm2, weight, nhw, True)
    assert relative_error(d_pre, want_dp) <= TOL
    for name, a, b in zip(("d_gamma", "d_beta", "dW"), got, want, strict=True):
        assert relative_error(a, b) <= TOL, name
    # dgrad forming dY from what the 3x3 backward left
    x, norm1, w1 = randn(m, 70, seed=7), norm_map(70, seed=8), randn(c, 70, seed=9) * 0.1
    grad_sum, expected_sum = torch.zeros(m, 70, device=y.device), torch.zeros(m, 70, device=y.device)
    d_gamma1, d_beta1, d_w1 = torch.empty(70), torch.empty(70), torch.empty(c, 70)
    bn_relu_gemm_backward.norm1_gemm_backward(d_pre, x, norm1, w1, grad_sum, d_gamma=d_gamma1, d_beta=d_beta1,
                                              d_weight=d_w1, norm2_grad=(y, vectors))  # fmt: skip
    want = bn_relu_gemm_backward.norm1_gemm_backward_reference(want_dy, x, norm1, w1, expected_sum, True)
    assert relative_error(grad_sum, expected_sum) <= TOL
    for name, a, b in zip(("d_gamma1", "d_beta1", "dW1"), (d_gamma1, d_beta1, d_w1), want, strict=True):
        assert relative_error(a, b) <= TOL, name


def _paired_dgrad_case():
    """The paired dgrad (two layers' contributions to one prefix) against the two layers one after the other."""
    buf, norm_l, w_l, d_y_l, upper, grads_u = paired_case(M, N, K)
    x, c = buf[:, :N], N
    grad_sum = randn(M, N, seed=25)
    expected = grad_sum.clone()
    got = [torch.empty(N, device=x.device) for _ in range(2)]
    bn_relu_gemm_backward.norm1_gemm_backward(d_y_l, x, norm_l, w_l, grad_sum, d_gamma=got[0], d_beta=got[1],
                                              upper=upper)  # fmt: skip
    reference = bn_relu_gemm_backward.norm1_gemm_backward_reference
    want = reference(d_y_l, x, norm_l, w_l, expected, False)
    want_u = reference(upper.d_y, x, upper.norm.channels(0, c), upper.weight[:, :c].contiguous(), expected, False)
    assert relative_error(grad_sum, expected) <= TOL
    for a, b in zip((*got, *grads_u[:, :c]), (*want[:2], *want_u[:2]), strict=True):
        assert relative_error(a, b) <= TOL


def _finalize_case():
    grad_sum, x, d_out = randn(M, N + 9, seed=31), randn(M, N + 5, seed=32), randn(M, N + 2, seed=33)
    vectors = (randn(N, seed=34), randn(N, seed=35).abs() + 0.5, randn(N, seed=36), randn(N, seed=37))
    g, xs, dy = grad_sum[:, 3 : 3 + N], x[:, 5:], d_out[:, 1 : 1 + N]
    for state in (vectors, None):  # training, eval
        out = torch.empty(M, N, device=g.device)
        finalize.finalize(g, xs, dy, out, state)
        assert relative_error(out, finalize.finalize_reference(g, xs, dy, state)) <= 1e-6


CASES = {
    "bn_relu_gemm": _gemm_case,
    "pooled_gemm": _pooled_gemm_case,
    "conv3x3": _conv3x3_case,
    "column_stats": _column_stats_case,
    "bn_relu_pool": _bn_relu_pool_case,
    "dgrad": lambda: (_norm1_backward_case(), _paired_dgrad_case()),
    "wgrad": _norm1_backward_case,
    "finalize": _finalize_case,
    "conv3x3_dgrad": _conv3x3_backward_case,
    "conv3x3_wgrad": _conv3x3_backward_case,
}


@pytest.mark.parametrize(
    "launcher,config",
    _every_config(
        bn_relu_gemm._bn_relu_gemm_kernel,
        bn_relu_gemm._pooled_gemm_kernel,
        conv3x3._conv3x3_kernel,
        stats._column_stats_kernel,
        bn_relu_pool._bn_relu_pool_kernel,
        bn_relu_gemm_backward._dgrad_kernel,
        bn_relu_gemm_backward._wgrad_kernel,
        finalize._finalize_kernel,
        conv3x3_backward._conv3x3_dgrad_kernel,
        conv3x3_backward._conv3x3_wgrad_kernel,
    ),
)
def test_every_configuration_matches_its_reference(launcher, config):
    with launcher.forced(config):
        CASES[launcher.name]()


def test_forcing_a_configuration_changes_the_launch():
    """The check above would prove nothing if ``forced`` did not reach the launch: a configuration whose
    tiles do not fit the kernel's shape rules (BLOCK_K not a power of two) must make the launch fail."""
    import triton

    launcher = bn_relu_gemm._bn_relu_gemm_kernel
    broken = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 24})
    with launcher.forced(broken), pytest.raises(Exception, match=r"power of (2|two)"):
        _gemm_case()


@pytest.mark.parametrize("chosen", range(len(stats._column_stats_kernel.configs)))
def test_a_tuned_launch_merges_the_partials_of_its_chosen_configuration(monkeypatch, chosen):
    """On a GPU the autotuner picks the configuration, and the launch's last programs merge the partials
    that configuration's programs wrote: here Triton's own autotuner runs under the interpreter with one
    configuration to choose from (no timing trials), the partial rows uninitialised (NaN)."""
    launcher = stats._column_stats_kernel
    monkeypatch.setattr(launcher, "configs", [launcher.configs[chosen]])
    monkeypatch.setattr(launcher, "config", lambda precision: None)  # tuned, as on a GPU
    launcher.__dict__.pop("_autotuners", None)  # built again from the one configuration
    try:
        _column_stats_case()
    finally:
        launcher.__dict__.pop("_autotuners", None)
