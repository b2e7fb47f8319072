import itertools

import pytest
import torch

from clipfast import clip_loss
from clipfast.backends.chunked import chunked_clip_loss_op

from ..parity import assert_parity

NS = [1, 2, 7, 97, 257]
DS = [1, 3, 65, 123, 512]
SCALES = [1.0, 14.3, 100.0]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bias", [None, -4.0])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_chunked_parity_fp32(n, d, scale, bias, normalize):
    # chunk_elements forces several row chunks wherever N > 2.
    assert_parity("chunked", n, d, scale=scale, bias=bias, normalize=normalize,
                  chunk_elements=max(1, n * max(1, n // 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(7, 65), (97, 123), (257, 512)])
def test_chunked_parity_half(n, d, dtype):
    assert_parity("chunked", n, d, x_dtype=dtype, scale=100.0, bias=2.0)


@pytest.mark.parametrize("x_dtype,y_dtype", [
    (torch.float16, torch.float32), (torch.bfloat16, torch.float16), (torch.float32, torch.float64)])
def test_chunked_parity_mixed_dtypes(x_dtype, y_dtype):
    assert_parity("chunked", 97, 65, x_dtype=x_dtype, y_dtype=y_dtype, bias=1.0)


@pytest.mark.parametrize("needs", [
    (True, False, False, False), (False, True, False, False), (False, False, True, False),
    (False, False, False, True), (True, True, False, True), (False, False, False, False)])
def test_chunked_partial_requires_grad(needs):
    assert_parity("chunked", 37, 29, bias=0.5, needs=needs, chunk_elements=37 * 5)


@pytest.mark.parametrize("normalize,with_bias", list(itertools.product([True, False], [True, False])))
@pytest.mark.parametrize("n,d,chunk", [(1, 1, 1), (5, 4, 5), (8, 3, 16)])
def test_chunked_gradcheck_fp64(n, d, chunk, normalize, with_bias):
    torch.manual_seed(n + d)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(4.2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if with_bias else None

    def fn(x, y, s, b):
        return chunked_clip_loss_op(x, y, s, b, normalize, True, chunk)

    assert torch.autograd.gradcheck(fn, (x, y, s, b))


def test_chunked_gradcheck_zero_feature_row():
    # A zero row sits on the clamp of the normalisation: the Jacobian is 1/eps.
    x = torch.randn(4, 3, dtype=torch.float64)
    x[2] = 0
    x.requires_grad_()
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64)
    got = torch.autograd.grad(clip_loss(x, y, s, backend="chunked"), (x, y))
    want = torch.autograd.grad(clip_loss(x, y, s, backend="reference"), (x, y))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * w.abs().max().item())


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("m,k,d,offset", [(1, 1, 3, 0), (5, 15, 7, 10), (33, 97, 65, 31), (40, 40, 9, 0)])
def test_chunked_row_cross_entropy_parity(m, k, d, offset, normalize):
    from clipfast.backends.chunked import ChunkedRowCrossEntropyFunction

    from ..parity import assert_row_ce_parity

    assert_row_ce_parity(ChunkedRowCrossEntropyFunction, m, k, d, offset, normalize=normalize,
                         extra_args=(max(1, k * 4),))


def test_chunked_row_cross_entropy_gradcheck_fp64():
    from clipfast.backends.chunked import ChunkedRowCrossEntropyFunction

    torch.manual_seed(3)
    q = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: ChunkedRowCrossEntropyFunction.apply(*a, True, 2, 8), (q, k, s, b))
