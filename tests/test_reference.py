import itertools
import math

import pytest
import torch

from clipfast import clip_loss
from clipfast.reference import reference_clip_loss


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
