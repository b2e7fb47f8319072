"""The C++ CPU backend (clipfast._cpu) against the reference."""

import itertools

import pytest
import torch

from clipfast import clip_loss
from clipfast.backends.cpu import available, cpu_clip_loss_op

from ..parity import assert_parity

NS = [1, 2, 7, 97, 257]
DS = [1, 3, 65, 123, 512]


def test_extension_is_built():
    # CI builds it with the package; its absence is a failure, not a skip.
    assert available(), "clipfast._cpu is missing: pip install -e . (or setup.py build_ext --inplace)"


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bias", [None, -4.0])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_cpu_parity_fp32(n, d, scale, bias, normalize):
    assert_parity("cpu", n, d, scale=scale, bias=bias, normalize=normalize)


@pytest.mark.parametrize("n,d", [(97, 123), (257, 65)])
def test_cpu_parity_fp64(n, d):
    assert_parity("cpu", n, d, x_dtype=torch.float64, scale=100.0, bias=1.0)


def test_cpu_parity_mixed_dtypes():
    assert_parity("cpu", 41, 37, x_dtype=torch.float32, y_dtype=torch.float64)


@pytest.mark.parametrize("needs", [
    (True, False, False, False), (False, True, False, False), (False, False, True, False),
    (False, False, False, True), (True, True, False, True)])
def test_cpu_partial_requires_grad(needs):
    assert_parity("cpu", 37, 29, bias=0.5, needs=needs)


@pytest.mark.parametrize("normalize,with_bias", list(itertools.product([True, False], [True, False])))
@pytest.mark.parametrize("n,d", [(1, 1), (5, 4), (40, 3)])
def test_cpu_gradcheck_fp64(n, d, normalize, with_bias):
    torch.manual_seed(n + d)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(4.2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if with_bias else None
    assert torch.autograd.gradcheck(
        lambda x, y, s, b: cpu_clip_loss_op(x, y, s, b, normalize), (x, y, s, b))


def test_cpu_results_are_bitwise_reproducible():
    # Static schedules and in-order merges: no dependence on thread timing
    # (gradcheck's reentrancy check relies on it).
    x = torch.randn(300, 7, dtype=torch.float64)
    y = torch.randn(300, 7, dtype=torch.float64)
    runs = []
    for _ in range(20):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        loss = clip_loss(xr, yr, scale, backend="cpu")
        runs.append((loss, *torch.autograd.grad(loss, (xr, yr, scale))))
    for other in runs[1:]:
        for got, want in zip(other, runs[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_zero_rows_match_reference():
    x = torch.randn(20, 9, dtype=torch.float64)
    y = torch.randn(20, 9, dtype=torch.float64)
    x[3] = 0
    y[5] = 1e-14
    x.requires_grad_()
    y.requires_grad_()
    got = torch.autograd.grad(clip_loss(x, y, 5.0, backend="cpu"), (x, y))
    want = torch.autograd.grad(clip_loss(x, y, 5.0, backend="reference"), (x, y))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * w.abs().max().item())


def test_cpu_rejects_half_precision():
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32 and float64"):
        clip_loss(x, x, 1.0, backend="cpu")


def test_cpu_non_contiguous_inputs():
    big = torch.randn(60, 80)
    x, y = big[::2, 5:50], big.t().contiguous().t()[1::2, 7:52]
    torch.testing.assert_close(clip_loss(x, y, 20.0, backend="cpu"),
                               clip_loss(x, y, 20.0, backend="chunked"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("values", [
    [0.5], [1.0, 3.0, -2.0], [float("-inf"), 2.0, float("-inf"), 5.0], [100.0, -100.0, 99.5],
    [float(v) for v in torch.randn(97) * 30]])
@pytest.mark.parametrize("parts", [1, 4, 16])
def test_shared_tile_math_logsumexp(values, parts):
    # lse_push / lse_merge are what the CUDA kernels run per tile and thread
    # group, masked (-inf) entries and empty groups included.
    from clipfast import _cpu

    want = torch.logsumexp(torch.tensor(values, dtype=torch.float64), 0).item()
    assert _cpu.logsumexp_by_push(values) == pytest.approx(want, rel=1e-6, abs=1e-5)
    assert _cpu.logsumexp_by_merge(values, parts) == pytest.approx(want, rel=1e-6, abs=1e-5)
    assert _cpu.logsumexp_by_lines(values, parts) == pytest.approx(want, rel=1e-6, abs=1e-5)


def test_shared_tile_math_keeps_nan_visible():
    import math

    from clipfast import _cpu

    assert math.isnan(_cpu.logsumexp_by_push([1.0, float("nan"), 2.0]))
    assert math.isnan(_cpu.logsumexp_by_merge([1.0, float("nan"), 2.0, 0.0], 2))
    for values in ([1.0, float("nan"), 2.0, 0.0], [float("nan")] * 3,
                   [float("-inf"), float("nan"), float("-inf")]):
        assert math.isnan(_cpu.logsumexp_by_lines(values, 2))
