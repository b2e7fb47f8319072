import itertools
import math

import pytest
import torch

from clipfast import clip_loss
from clipfast.backends.reference import reference_clip_loss


def _loss_from_spec(x, y, s, b, normalize):
    """The DESIGN.md formula, written with explicit log-sum-exps."""
    if normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        y = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
    logits = s * x @ y.t() + (0.0 if b is None else b)
    row = torch.logsumexp(logits, dim=1)
    col = torch.logsumexp(logits, dim=0)
    n = x.shape[0]
    return (row.sum() + col.sum() - 2 * logits.diagonal().sum()) / (2 * n)


@pytest.mark.parametrize("normalize,with_bias", list(itertools.product([True, False], [True, False])))
@pytest.mark.parametrize("n,d", [(1, 1), (7, 3), (23, 17)])
def test_reference_matches_the_spec(n, d, normalize, with_bias):
    torch.manual_seed(n * 31 + d)
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    s = torch.tensor(14.3, dtype=torch.float64)
    b = torch.tensor(-3.0, dtype=torch.float64) if with_bias else None
    got = reference_clip_loss(x, y, s, b, normalize)
    want = _loss_from_spec(x, y, s, b, normalize)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_single_pair_is_zero():
    x = torch.randn(1, 5, dtype=torch.float64)
    assert clip_loss(x, x * 2, 10.0, backend="reference").item() == pytest.approx(0.0, abs=1e-12)


def test_reference_uniform_logits_give_log_n():
    n = 9
    x = torch.zeros(n, 4, dtype=torch.float64)
    loss = clip_loss(x, x, 100.0, backend="reference")
    assert loss.item() == pytest.approx(math.log(n), rel=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_gradcheck_fp64(normalize, with_bias):
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True) if with_bias else None

    def fn(x, y, s, *rest):
        return clip_loss(x, y, s, logit_bias=rest[0] if rest else None,
                         normalize=normalize, backend="reference")

    args = (x, y, s) + ((b,) if with_bias else ())
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_bias_gradient_is_exactly_zero(dtype, normalize):
    # Summing N^2 rounded dL/dlogits used to leave ~1e-8 here.
    torch.manual_seed(3)
    x = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    y = (x.detach() + torch.randn(37, 16, dtype=dtype)).requires_grad_()
    s = torch.tensor(30.0, dtype=dtype, requires_grad=True)
    b = torch.tensor(-2.5, dtype=dtype, requires_grad=True)
    loss = reference_clip_loss(x, y, s, b, normalize)
    grads = torch.autograd.grad(loss, (x, y, s, b))
    assert grads[3].item() == 0.0 and grads[3].shape == b.shape
    # The bias is still in the logits: the loss equals the unbiased one up to
    # rounding (the logits are shifted), and the other gradients match it.
    without = reference_clip_loss(x, y, s, None, normalize)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss, without, rtol=0, atol=64 * eps * 32.5)
    for g, w in zip(grads[:3], torch.autograd.grad(without, (x, y, s))):
        torch.testing.assert_close(g, w, rtol=1e-3 if dtype == torch.float32 else 1e-10,
                                   atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_reference_bias_gradient_keeps_nan():
    x = torch.randn(5, 3, requires_grad=True)
    y = torch.randn(5, 3)
    y[2, 1] = float("nan")
    b = torch.tensor(1.0, requires_grad=True)
    loss = reference_clip_loss(x, y, torch.tensor(10.0), b)
    (g,) = torch.autograd.grad(loss, b)
    assert torch.isnan(loss) and torch.isnan(g)


def test_reference_bias_gradient_shape_and_double_backward():
    torch.manual_seed(4)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([7.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-1.5], dtype=torch.float64, requires_grad=True)
    loss = reference_clip_loss(x, y, s, b)
    gx, gb = torch.autograd.grad(loss, (x, b), create_graph=True)
    assert gb.shape == (1,) and gb.item() == 0.0
    # Second order: d(|dL/dx|^2)/dy through the whole graph, and the bias
    # gradient's own graph differentiates to zero.
    (hy,) = torch.autograd.grad((gx ** 2).sum(), y, retain_graph=True)
    assert torch.isfinite(hy).all() and hy.abs().max() > 0
    (hb,) = torch.autograd.grad(gb.sum(), x, allow_unused=True)
    assert hb is None or (hb == 0).all()
    assert torch.autograd.gradgradcheck(
        lambda x_, y_, s_, b_: reference_clip_loss(x_, y_, s_, b_), (x, y, s, b))


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 3e37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_huge_rows_give_the_loss_of_their_directions(magnitude, dtype):
    # F.normalize squares the rows: past ~1e19 the norm overflowed to inf and
    # the rows became zeros (loss log N, zero gradients).
    torch.manual_seed(5)
    x, y = torch.randn(9, 6), torch.randn(9, 6)
    y[:4] += 2 * x[:4]
    s = torch.tensor(20.0)
    unit = reference_clip_loss(x.double(), y.double(), s.double())
    xh = (x * magnitude).to(dtype).requires_grad_()
    yh = (y * magnitude).to(dtype).requires_grad_()
    loss = reference_clip_loss(xh, yh, s)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert loss.item() == pytest.approx(unit.item(), rel=tol)
    gx, gy = torch.autograd.grad(loss, (xh, yh))
    xd = x.double().requires_grad_()
    gx_unit, = torch.autograd.grad(reference_clip_loss(xd, y.double(), s.double()), xd)
    # d loss / dx scales as 1 / magnitude.
    want = gx_unit * (x.double().norm(dim=1, keepdim=True) / (xh.double().norm(dim=1, keepdim=True)))
    torch.testing.assert_close(gx.double(), want, rtol=tol * 10, atol=tol * 10 * want.abs().max().item())
    assert torch.isfinite(gy).all()


def test_reference_huge_rows_without_normalize_are_not_finite():
    x = torch.randn(4, 3) * 1e20
    loss = reference_clip_loss(x, x, torch.tensor(1.0), normalize=False)
    assert not torch.isfinite(loss)
