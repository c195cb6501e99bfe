"""Each Triton kernel against its plain-PyTorch reference on tiny odd shapes (M and C not multiples of
the block sizes, C = 1, k = 1), in float32, float16 and bfloat16. Without a GPU these run in the Triton
interpreter on CPU tensors (the root conftest sets TRITON_INTERPRET=1 before Triton is imported)."""

from __future__ import annotations

import pytest
import torch

from fastdense.batchnorm import NormMap
from fastdense.kernels.bn_relu_gemm import bn_relu_gemm, bn_relu_gemm_reference
from fastdense.kernels.bn_relu_pool import bn_relu_pool, bn_relu_pool_reference
from fastdense.kernels.conv3x3 import conv3x3, conv3x3_reference
from fastdense.kernels.launch import INTERPRET
from fastdense.kernels.stats import column_stats, column_stats_reference
from fastdense.tools.verify import relative_error

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Same inputs, same rounding points: the kernels match their references up to float32 summation order
# (an occasional one-ulp difference after rounding); a truncating bf16 cast is ~4e-3 off.
TOL = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 2e-3}


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype).to(DEVICE)


def norm_map(c, seed=1, from_var=False, dtype=torch.float32):
    """A BatchNorm map of ``c`` channels as the kernels take it: batch statistics (the mean and rstd) or,
    ``from_var``, running ones (a variance and eps); weight and bias in ``dtype`` (a half model's)."""
    inv = randn(c, seed=seed + 1).abs() + 0.5
    return NormMap(randn(c, seed=seed), inv, randn(c, seed=seed + 2).to(dtype), randn(c, seed=seed + 3).to(dtype),
                   1e-3 if from_var else 0.0, from_var)  # fmt: skip


def statistics_view(c, pad=3):
    """A float32 ``(3, c)`` statistics view (rows mean, rstd, variance) inside a wider array (a dense block's,
    for one column range)."""
    return torch.full((3, c + 2 * pad), float("nan"), device=DEVICE)[:, pad : pad + c]


def assert_statistics(stats, columns, eps):
    want = column_stats_reference(columns.float(), eps)
    for name, got, expected, tol in zip(("mean", "rstd", "var"), stats, want, (1e-6, 1e-5, 1e-5), strict=True):
        assert relative_error(got, expected) <= tol, name


@pytest.mark.parametrize("m,c,offset", [(1, 1, 0), (300, 20, 3), (1000, 67, 0), (9000, 3, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_stats(m, c, offset, dtype):
    """A column slice of a wider buffer (row stride > C), large mean against the spread, written into a view
    of a wider statistics array; 9000 rows: more than one group of partials (two merge levels)."""
    buf = randn(m, c + offset + 2, dtype=dtype, scale=3.0, offset=100.0)
    cols = buf[:, offset : offset + c]
    stats = statistics_view(c)
    assert column_stats(cols, 1e-5, out=stats) is stats
    assert_statistics(stats, cols, 1e-5)


def test_column_stats_of_an_empty_batch_leave_nothing_normalised():
    mean, rstd, var = column_stats(randn(0, 5), 1e-5)
    assert not mean.any() and not var.any() and torch.allclose(rstd, torch.full_like(rstd, 1e-5**-0.5))


def test_the_last_programs_merge_every_partial_once():
    """Many programs, two merge levels, in every kernel that merges its own partials: the statistics are
    the rows' and the counters are zero again after the launch (the next launch, or an autotuning trial,
    starts from zero)."""
    from fastdense.kernels.last_program import CounterPool

    pool = CounterPool(4096, torch.device(DEVICE))
    x = randn(2000, 6, scale=2.0, offset=-7.0)
    stats = column_stats(x, 1e-5, pool=pool)
    assert_statistics(stats, x, 1e-5)
    norm, weight = norm_map(6), randn(5, 6, seed=3)
    y = bn_relu_gemm(x, norm, weight, stats=(gemm_stats := statistics_view(5)), stats_eps=1e-5, pool=pool)
    assert_statistics(gemm_stats, y, 1e-5)
    assert pool.used > 0 and not pool.array.any()  # every counter back at zero


@pytest.mark.parametrize("m,k_in,n_out", [(1, 1, 1), (77, 37, 19), (130, 70, 48)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_gemm_with_statistics(m, k_in, n_out, dtype):
    """Training shape: a column prefix of a wider buffer, norm2's statistics from the epilogue."""
    buf = randn(m, k_in + 5, dtype=dtype)
    x, norm, weight = buf[:, :k_in], norm_map(k_in), randn(n_out, k_in, dtype=dtype, seed=7)
    stats = statistics_view(n_out)
    y = bn_relu_gemm(x, norm, weight, stats=stats, stats_eps=1e-5)
    expected = bn_relu_gemm_reference(x, norm, weight)
    assert y.dtype == dtype and relative_error(y, expected) <= TOL[dtype]
    assert_statistics(stats, y, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_gemm_eval_epilogue_and_out_slice(dtype):
    """Eval mode: both maps from running statistics (a variance and eps), the weights of a half model."""
    m, k_in, n_out = 45, 21, 13
    x, weight = randn(m, k_in, dtype=dtype), randn(n_out, k_in, dtype=dtype, seed=7)
    norm, epilogue = norm_map(k_in, from_var=True, dtype=dtype), norm_map(n_out, seed=11, from_var=True, dtype=dtype)
    out = torch.zeros(m, n_out + 4, dtype=dtype, device=DEVICE)
    bn_relu_gemm(x, norm, weight, epilogue=epilogue, out=out[:, 2 : 2 + n_out])
    expected = bn_relu_gemm_reference(x, norm, weight, epilogue=epilogue)
    assert relative_error(out[:, 2 : 2 + n_out], expected) <= TOL[dtype]
    assert not out[:, :2].any() and not out[:, 2 + n_out :].any()  # nothing written outside the slice


@pytest.mark.parametrize("hw", [(2, 2), (6, 7), (5, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_gemm_pooled_prologue(hw, dtype):
    """The transition: 2x2 average pool of relu(bn(x)) inside the prologue, odd sizes floored."""
    h, w = hw
    buf = randn(3 * h * w, 24, dtype=dtype)
    x, norm, weight = buf[:, :23], norm_map(23), randn(10, 23, dtype=dtype, seed=7)
    y = bn_relu_gemm(x, norm, weight, pool_hw=hw)
    expected = bn_relu_gemm_reference(x, norm, weight, pool_hw=hw)
    assert y.shape == (3 * (h // 2) * (w // 2), 10) and relative_error(y, expected) <= TOL[dtype]


@pytest.mark.parametrize("nhw,c,k", [((1, 1, 1), 1, 1), ((2, 5, 7), 19, 3), ((3, 4, 6), 40, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv3x3_into_a_buffer_slice_with_dropout_and_statistics(nhw, c, k, dtype):
    m = nhw[0] * nhw[1] * nhw[2]
    y, weight, prologue = randn(m, c, dtype=dtype), randn(k, c, 3, 3, dtype=dtype, seed=5), norm_map(c)
    noise = ((randn(m, k, seed=9) > 0).to(dtype) * 2).contiguous()  # keep with p = 0.5, scaled by 2
    buf = torch.zeros(m, k + 7, dtype=dtype, device=DEVICE)
    stats = statistics_view(k)
    conv3x3(y, weight, nhw, buf[:, 4 : 4 + k], prologue=prologue, noise=noise, stats=stats, stats_eps=1e-5)
    expected = conv3x3_reference(y, weight, nhw, prologue=prologue, noise=noise)
    assert relative_error(buf[:, 4 : 4 + k], expected) <= TOL[dtype]
    assert not buf[:, :4].any() and not buf[:, 4 + k :].any()
    assert_statistics(stats, buf[:, 4 : 4 + k], 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv3x3_without_prologue(dtype):
    """Eval mode: the bottleneck already holds relu(norm2(Y)) from the GEMM's epilogue."""
    nhw, c, k = (2, 3, 5), 8, 4
    y, weight = randn(30, c, dtype=dtype).relu(), randn(k, c, 3, 3, dtype=dtype, seed=5)
    out = torch.empty(30, k, dtype=dtype, device=DEVICE)
    assert conv3x3(y, weight, nhw, out) is out
    assert relative_error(out, conv3x3_reference(y, weight, nhw)) <= TOL[dtype]


@pytest.mark.parametrize(
    "window", [(3, 2, 1, True), (2, 2, 0, False), ((9, 7), 9, 0, False)], ids=["maxpool-stem", "avgpool", "global"]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_pool(window, dtype):
    x = randn(2, 19, 9, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
    norm = norm_map(19, from_var=window[3])
    out = bn_relu_pool(x, norm, *window)
    expected = bn_relu_pool_reference(x, norm, *window)
    assert out.shape == expected.shape and relative_error(out, expected) <= TOL[dtype]


@pytest.mark.parametrize("window", [(3, 2, 1, True), (2, 2, 0, False)], ids=["max", "avg"])
def test_nan_and_inf_propagate_like_pytorch(window):
    x = randn(2, 5, 6, 6).contiguous(memory_format=torch.channels_last)
    x[0, 1, 2, 2], x[1, 3, 4, 4], x[1, 0, 0, 0] = float("nan"), float("inf"), float("-inf")
    zeros, ones = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    norm = NormMap(zeros, ones, ones, zeros)
    out, expected = bn_relu_pool(x, norm, *window), bn_relu_pool_reference(x, norm, *window)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    rows = x.permute(0, 2, 3, 1).reshape(-1, 5)
    y = bn_relu_gemm(rows, norm, randn(3, 5, seed=4))
    y_ref = bn_relu_gemm_reference(rows, norm, randn(3, 5, seed=4))
    assert torch.equal(y.isnan(), y_ref.isnan())


def test_float32_products_follow_cudnns_tf32_switch(monkeypatch):
    """The suite turns TF32 off (tests/conftest.py); a float32 model otherwise gets what cuDNN's
    convolutions get, and the half-precision products are tensor-core products either way."""
    from fastdense.kernels.launch import dot_precision

    assert dot_precision(torch.float32) == "ieee"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert dot_precision(torch.float32) == "tf32"
    assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"


def test_bad_arguments_are_refused_clearly():
    x = randn(10, 6)
    with pytest.raises(ValueError, match=r"weight must be a contiguous 4 x 6 matrix to match x's 6 columns"):
        bn_relu_gemm(x, norm_map(6), randn(4, 5))
    with pytest.raises(ValueError, match="unit column stride"):
        bn_relu_gemm(x.t(), norm_map(10), randn(4, 10))
    with pytest.raises(ValueError, match=r"weight must be a contiguous \(3, 6, 3, 3\)"):
        conv3x3(x, randn(3, 5, 3, 3), (1, 2, 5), randn(10, 3))
    with pytest.raises(ValueError, match="channels_last"):
        bn_relu_pool(randn(1, 3, 4, 4), norm_map(3), 2, 2, 0, False)
    with pytest.raises(ValueError, match=r"statistics out must be a float32 \(3, 4\) array"):
        bn_relu_gemm(x, norm_map(6), randn(4, 6), stats=torch.empty(4, 3, device=DEVICE))


def test_more_rows_than_int32_indices_reach_are_refused_before_launch():
    """Row indices are int32 in the kernels: 2^31 rows (a zero-stride view, no memory) must raise, not wrap."""
    rows = randn(1, 4).expand(2**31, 4)
    with pytest.raises(ValueError, match=r"column_stats: 2147483648 rows .* split the batch"):
        column_stats(rows)
    with pytest.raises(ValueError, match=r"bn_relu_gemm: 2147483648 rows"):
        bn_relu_gemm(rows, norm_map(4), randn(2, 4))


def test_kernel_microbenchmark_runs_and_writes_json(tmp_path, capsys):
    """``python -m fastdense kernels``: every kernel against its PyTorch counterpart, same shapes (on the
    CPU a toy-size smoke run in the interpreter; the GPU figures come from benchmarks/gpu_check.sh)."""
    import json

    from fastdense.tools import kernel_bench

    kernel_bench.main(["--json", str(tmp_path / "k.json"), "--repeats", "1"])
    result = json.loads((tmp_path / "k.json").read_text())
    by_kernel = {}
    for row in result["rows"]:
        assert row["ms"] > 0 and row["GB_per_s"] > 0 and row["TFLOP_per_s"] > 0
        by_kernel.setdefault(row["kernel"], set()).add(row["candidate"])
    assert by_kernel == {
        "bn_relu_gemm": {"triton bn_relu_gemm", "cat+BN+ReLU+cuDNN 1x1"},
        "conv3x3": {"triton conv3x3 (prologue+stats)", "BN-ReLU+cuDNN 3x3+copy+stats"},
    }
    assert "triton bn_relu_gemm" in capsys.readouterr().out


@pytest.mark.parametrize("from_var", [False, True], ids=["batch", "running"])
@pytest.mark.parametrize("m,c,k", [(1, 1, 1), (70, 37, 19), (130, 66, 48), (1100, 5, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm1_gemm_backward(m, c, k, dtype, from_var):
    """dgrad (mask recomputed, accumulated into a wider G, norm1's gradients and the block's sums written by
    the last programs; 1100 rows: two merge levels) and wgrad against PyTorch, with batch (training) and
    running (eval) statistics."""
    from fastdense.kernels.bn_relu_gemm_backward import norm1_gemm_backward, norm1_gemm_backward_reference

    buf = randn(m, c + 3, dtype=dtype)
    x, norm = buf[:, :c], norm_map(c, from_var=from_var)
    weight, d_y = randn(k, c, dtype=dtype, seed=23), randn(m, k, dtype=dtype, seed=24)
    grad_sum = randn(m, c + 5, seed=25)  # earlier consumers' contributions, kept
    sums = randn(2, c + 4, seed=26)[:, 1 : 1 + c]  # the block's sums of G and G * xhat so far
    expected_sum, expected_sums = grad_sum.clone(), sums.clone()
    d_gamma, d_beta, d_w = (torch.empty(shape, device=DEVICE) for shape in (c, c, (k, c)))
    norm1_gemm_backward(d_y, x, norm, weight, grad_sum, d_gamma=d_gamma, d_beta=d_beta, d_weight=d_w, sums=sums)
    want = norm1_gemm_backward_reference(d_y, x, norm, weight, expected_sum, True, sums=expected_sums)
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # fp32 accumulation in both; only summation order differs
    assert relative_error(grad_sum, expected_sum) <= tol and relative_error(sums, expected_sums) <= tol
    for name, a, b in zip(("d_gamma", "d_beta", "dW"), (d_gamma, d_beta, d_w), want, strict=True):
        assert relative_error(a, b) <= tol, name


def test_the_first_dgrad_into_the_gradient_buffer_writes_it():
    """The block's last layer writes G's prefix (no zero-fill before it); the columns after it are untouched."""
    from fastdense.kernels.bn_relu_gemm_backward import norm1_gemm_backward, norm1_gemm_backward_reference

    m, c, k = 50, 9, 6
    x, norm, weight, d_y = randn(m, c), norm_map(c), randn(k, c, seed=23), randn(m, k, seed=24)
    grad_sum = torch.full((m, c + 4), float("nan"), device=DEVICE)
    expected = grad_sum.clone()
    d_gamma, d_beta = torch.empty(c, device=DEVICE), torch.empty(c, device=DEVICE)
    norm1_gemm_backward(d_y, x, norm, weight, grad_sum, d_gamma=d_gamma, d_beta=d_beta, first=True)
    norm1_gemm_backward_reference(d_y, x, norm, weight, expected, False, first=True)
    assert relative_error(grad_sum[:, :c], expected[:, :c]) <= 1e-5 and grad_sum[:, c:].isnan().all()


@pytest.mark.parametrize("from_var", [False, True], ids=["batch", "running"])
@pytest.mark.parametrize("nhw,c,k", [((1, 1, 1), 1, 1), ((2, 5, 7), 37, 19), ((1, 3, 2), 20, 48), ((1, 47, 45), 6, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv3x3_norm2_backward(nhw, c, k, dtype, from_var):
    """The 3x3 conv's backward through relu2 and norm2 (kernels.conv3x3_backward) against PyTorch's
    convolution_backward on the recomputed activation: norm2's output gradient, its weight and bias
    gradients, the conv's weight gradient (1x1 images: every tap outside; 2115 rows: two merge levels of the
    sums), and the bottleneck's gradient as the 1x1 backward forms it from them (the gradient buffer and
    norm1's gradients as from that dY)."""
    from fastdense.kernels.bn_relu_gemm_backward import norm1_gemm_backward, norm1_gemm_backward_reference
    from fastdense.kernels.conv3x3_backward import conv3x3_norm2_backward, conv3x3_norm2_backward_reference

    m = nhw[0] * nhw[1] * nhw[2]
    y, norm2 = randn(m, c, dtype=dtype, seed=30), norm_map(c, seed=31, from_var=from_var)
    weight, d_new = randn(k, c, 3, 3, dtype=dtype, seed=32, scale=0.3), randn(m, k, dtype=dtype, seed=33)
    d_gamma, d_beta, d_w = torch.empty(c, device=DEVICE), torch.empty(c, device=DEVICE), torch.empty(k, c, 3, 3)
    d_pre, vectors = conv3x3_norm2_backward(d_new, y, norm2, weight, nhw, d_gamma=d_gamma, d_beta=d_beta,
                                            d_weight=d_w)  # fmt: skip
    want_dp, want_dy, *want = conv3x3_norm2_backward_reference(d_new, y, norm2, weight, nhw, not from_var)
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # fp32 accumulation in both; only summation order differs
    assert d_pre.dtype == dtype and relative_error(d_pre, want_dp) <= TOL[dtype]
    for name, got, expected in zip(("d_gamma", "d_beta", "dW"), (d_gamma, d_beta, d_w), want, strict=True):
        assert relative_error(got, expected) <= tol, name

    c_in, x, norm1 = 9, randn(m, 9, dtype=dtype, seed=34), norm_map(9, seed=35)
    w1 = randn(c, c_in, dtype=dtype, seed=36)
    grad_sum, expected_sum = torch.zeros(m, c_in, device=DEVICE), torch.zeros(m, c_in, device=DEVICE)
    got = [torch.empty(shape, device=DEVICE) for shape in (c_in, c_in, (c, c_in))]
    norm1_gemm_backward(d_pre, x, norm1, w1, grad_sum, d_gamma=got[0], d_beta=got[1], d_weight=got[2],
                        norm2_grad=(y, vectors))  # fmt: skip
    expected = norm1_gemm_backward_reference(want_dy, x, norm1, w1, expected_sum, True)
    # dY is rounded to the compute dtype in both; a one-ulp difference there moves P by as much
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    assert relative_error(grad_sum, expected_sum) <= tol
    for name, a, b in zip(("d_gamma1", "d_beta1", "dW1"), got, expected, strict=True):
        assert relative_error(a, b) <= tol, name


def paired_case(m, c, k, dtype=torch.float32, from_var=False, seed=50):
    """A pair of layers for the paired dgrad: the lower reads the buffer's first ``c`` columns, the upper
    ``c + 5`` (its own new columns past them); with batch statistics both maps share the buffer's mean and
    rstd, with running ones each has its own."""
    from fastdense.kernels.bn_relu_gemm_backward import UpperLayer

    c_up = c + 5
    buf = randn(m, c_up + 2, dtype=dtype, seed=seed)
    norm_u = norm_map(c_up, seed=seed + 1, from_var=from_var)
    other = norm_map(c, seed=seed + 5, from_var=from_var)
    norm_l = other if from_var else NormMap(norm_u.mean[:c], norm_u.inv[:c], other.weight, other.bias, 0.0, False)
    w_l, w_u = randn(k, c, dtype=dtype, seed=seed + 2), randn(k, c_up, dtype=dtype, seed=seed + 3)
    d_y_l, d_y_u = randn(m, k, dtype=dtype, seed=seed + 4), randn(m, k, dtype=dtype, seed=seed + 6)
    grads_u = torch.full((2, c_up), float("nan"), device=DEVICE)  # the upper's own columns: another launch's
    upper = UpperLayer(d_y_u, w_u, norm_u, grads_u[0, :c], grads_u[1, :c])
    return buf, norm_l, w_l, d_y_l, upper, grads_u


@pytest.mark.parametrize("from_var", [False, True], ids=["batch", "running"])
@pytest.mark.parametrize("m,c,k", [(1, 1, 1), (70, 37, 19), (1100, 5, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paired_dgrad_adds_both_layers_once(m, c, k, dtype, from_var):
    """Two layers' 1x1 backward in one dgrad launch over the prefix they share (each with its own dY, weight,
    mask and norm1 gradients, the upper's weight read past the prefix): G's columns and the block's sums as
    from two launches, one after the other; the upper layer's gradient vectors written for the prefix only."""
    from fastdense.kernels.bn_relu_gemm_backward import norm1_gemm_backward, norm1_gemm_backward_reference

    buf, norm_l, w_l, d_y_l, upper, grads_u = paired_case(m, c, k, dtype, from_var)
    x = buf[:, :c]
    grad_sum, sums = randn(m, c + 5, seed=25), randn(2, c, seed=26)
    expected_sum, expected_sums = grad_sum.clone(), sums.clone()
    got = [torch.empty(shape, device=DEVICE) for shape in (c, c, (k, c))]
    norm1_gemm_backward(d_y_l, x, norm_l, w_l, grad_sum, d_gamma=got[0], d_beta=got[1], d_weight=got[2],
                        sums=None if from_var else sums, upper=upper)  # fmt: skip
    sums_ref = None if from_var else expected_sums
    want = norm1_gemm_backward_reference(d_y_l, x, norm_l, w_l, expected_sum, True, sums=sums_ref)
    want_u = norm1_gemm_backward_reference(upper.d_y, x, upper.norm.channels(0, c), upper.weight[:, :c].contiguous(),
                                           expected_sum, False, sums=sums_ref)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # fp32 accumulation in both; only summation order differs
    assert relative_error(grad_sum, expected_sum) <= tol and relative_error(sums, expected_sums) <= tol
    for name, a, b in zip(("d_gamma", "d_beta", "dW"), got, want, strict=True):
        assert relative_error(a, b) <= tol, name
    for name, a, b in zip(("upper d_gamma", "upper d_beta"), grads_u[:, :c], want_u, strict=False):
        assert relative_error(a, b) <= tol, name
    assert grads_u[:, c:].isnan().all()  # the upper's own columns are not this launch's


def test_conv3x3_norm2_backward_propagates_nan_and_refuses_bad_arguments():
    """A NaN in the new features' gradient reaches the bottleneck's rows it touches, as through PyTorch's
    convolution_backward; shapes that do not fit are refused before any launch."""
    from fastdense.kernels.conv3x3_backward import conv3x3_norm2_backward

    nhw, c, k = (1, 4, 4), 5, 3
    y, norm2, weight = randn(16, c, seed=40), norm_map(c, seed=41, from_var=True), randn(k, c, 3, 3, seed=42)
    d_new = randn(16, k, seed=43)
    d_new[5, 1] = float("nan")
    d_gamma, d_beta = torch.empty(c, device=DEVICE), torch.empty(c, device=DEVICE)
    d_pre, _ = conv3x3_norm2_backward(d_new, y, norm2, weight, nhw, d_gamma=d_gamma, d_beta=d_beta)
    active = ((y - norm2.mean) * norm2.weight * (norm2.inv + norm2.eps).rsqrt() + norm2.bias) > 0
    neighbours = torch.zeros(16, dtype=torch.bool)
    neighbours.view(4, 4)[0:3, 0:3] = True  # pixel 5 is (1, 1): its 3x3 neighbourhood
    assert d_pre[neighbours[:, None] & active].isnan().all() and not d_pre[~neighbours].isnan().any()
    assert d_gamma.isnan().any() and d_beta.isnan().any()
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        conv3x3_norm2_backward(d_new, y, norm2, weight[:, :4], nhw, d_gamma=d_gamma, d_beta=d_beta)
    with pytest.raises(ValueError, match="d_new must be"):
        conv3x3_norm2_backward(d_new[:15], y, norm2, weight, nhw, d_gamma=d_gamma, d_beta=d_beta)
    with pytest.raises(ValueError, match="y must be a contiguous 20 x C"):
        conv3x3_norm2_backward(d_new, y, norm2, weight, (1, 4, 5), d_gamma=d_gamma, d_beta=d_beta)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_finalize(training, dtype):
    """A column range of G, the buffer and the output gradient (all wider matrices) to its input gradient."""
    from fastdense.kernels.finalize import finalize, finalize_reference

    m, c = 77, 13
    grad_sum, buf, d_out = randn(m, c + 9, seed=31), randn(m, c + 5, dtype=dtype, seed=32), randn(m, c + 2, seed=33)
    stats = (randn(c, seed=34), randn(c, seed=35).abs() + 0.5, randn(c, seed=36), randn(c, seed=37))
    stats = stats if training else None
    noise = ((randn(m, c, seed=38) > 0).to(dtype) * 2).contiguous()
    g, x, dy = grad_sum[:, 3 : 3 + c], buf[:, 5:], d_out[:, 1 : 1 + c].to(dtype)
    out = torch.empty(m, c, dtype=torch.float32, device=DEVICE)
    finalize(g, x, dy, out, stats, noise)
    assert relative_error(out, finalize_reference(g, x, dy, stats, noise)) <= 1e-6
