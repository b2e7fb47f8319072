"""The C++ CPU backend's SigLIP loss (clipfast._cpu) against open_clip's
formula (clipfast.backends.reference.reference_siglip_loss)."""

import pytest
import torch

import clipfast
from clipfast.backends.cpu import available, cpu_siglip_ops
from clipfast.backends.reference import reference_siglip_loss

from ..parity import make_features
from ..siglip_parity import assert_siglip_parity, loss_and_grads, scalars

pytestmark = pytest.mark.skipif(not available(), reason="clipfast._cpu is not built")

SHAPES = [(1, 1), (1, 65), (7, 3), (7, 65), (97, 1), (97, 65), (130, 3)]


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bias", [None, -10.0, 3.0])
@pytest.mark.parametrize("positives", [True, False])
def test_siglip_cpu_parity_fp32(n, d, normalize, bias, positives):
    # Scales from 1 to 100 across the grid; without normalisation the raw
    # features (norm ~ sqrt(d)) make logits up to ~100 d already.
    scale = {1: 1.0, 3: 10.0, 65: 100.0}[d] if normalize else {1: 1.0, 3: 3.0, 65: 0.5}[d]
    assert_siglip_parity("cpu", n, d, scale=scale, bias=bias, normalize=normalize,
                         positives=positives, correlated=n % 2 == 1)


@pytest.mark.parametrize("positives", [True, False])
@pytest.mark.parametrize("bias", [None, -10.0])
def test_siglip_cpu_fp64_matches_reference(positives, bias):
    # fp64 in, fp64 out: equal to the formula to 1e-9 (relative), every gradient.
    x, y = make_features(97, 33, torch.float64, "cpu", seed=3)
    s, b = scalars(17.0, bias)
    s, b = s.double(), None if b is None else b.double()
    got = loss_and_grads(lambda *a: clipfast.siglip_loss(*a, normalize=True, backend="cpu",
                                                         positives=positives),
                         x, y, s, b, (True, True, True, True))
    want = loss_and_grads(lambda *a: reference_siglip_loss(*a, normalize=True,
                                                           positives=positives),
                          x, y, s, b, (True, True, True, True))
    assert set(got) == set(want)
    assert got["loss"].dtype == torch.float64
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9,
                                   atol=1e-9 * want[key].abs().max().item())


@pytest.mark.parametrize("normalize,with_bias,positives", [
    (True, True, True), (False, True, False), (True, False, False), (False, False, True)])
@pytest.mark.parametrize("n,d", [(1, 1), (5, 4), (33, 3)])
def test_siglip_cpu_gradcheck_fp64(n, d, normalize, with_bias, positives):
    gen = torch.Generator().manual_seed(n * 10 + d)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen).requires_grad_()
    y = torch.randn(n, d, dtype=torch.float64, generator=gen).requires_grad_()
    s = torch.tensor(4.2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.3, dtype=torch.float64, requires_grad=True) if with_bias else None
    op = cpu_siglip_ops[positives]
    # The larger shape (two row blocks) in fast mode: a random projection
    # of the Jacobian instead of all of its 200 columns.
    assert torch.autograd.gradcheck(lambda x, y, s, b: op(x, y, s, b, normalize), (x, y, s, b),
                                    fast_mode=n > 8)


@pytest.mark.parametrize("needs", [
    (True, False, False, False), (False, True, False, False), (False, False, True, False),
    (False, False, False, True), (True, True, False, True)])
def test_siglip_cpu_partial_requires_grad(needs):
    assert_siglip_parity("cpu", 37, 29, scale=20.0, bias=-5.0, needs=needs)


def test_siglip_cpu_mixed_dtypes():
    # fp32 with fp64 computes in fp64; each gradient in its input's dtype.
    assert_siglip_parity("cpu", 41, 37, x_dtype=torch.float32, y_dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [-10.0, 10.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_siglip_cpu_large_logits_are_finite_and_exact(dtype, bias, normalize):
    # Scale 100 and |bias| 10: unit-row logits in [-110, 110]; raw rows of
    # norm ~ 8 make them ~ 6000. Every term past exp's range in a naive
    # log(1 + exp(-t)), sigmoid 0 or 1 to the last bit.
    if dtype == torch.float64:
        x, y = make_features(45, 64, dtype, "cpu", seed=4)
        s, b = scalars(100.0, bias)
        s, b = s.double(), b.double()
        needs = (True, True, True, True)
        got = loss_and_grads(lambda *a: clipfast.siglip_loss(*a, normalize=normalize,
                                                             backend="cpu"), x, y, s, b, needs)
        want = loss_and_grads(lambda *a: reference_siglip_loss(*a, normalize=normalize),
                              x, y, s, b, needs)
        for key in want:
            assert torch.isfinite(got[key]).all(), key
            torch.testing.assert_close(got[key], want[key], rtol=1e-9,
                                       atol=1e-9 * max(want[key].abs().max().item(), 1e-300))
    else:
        got, _ = assert_siglip_parity("cpu", 45, 64, scale=100.0, bias=bias,
                                      normalize=normalize)
        assert all(torch.isfinite(g).all() for g in got.values())


@pytest.mark.parametrize("where", ["image", "text"])
def test_siglip_cpu_nan_is_never_hidden(where):
    x, y = make_features(40, 8, torch.float32, "cpu", seed=2)
    (x if where == "image" else y)[7, 3] = float("nan")
    x.requires_grad_()
    y.requires_grad_()
    s, b = scalars(10.0, -10.0)
    s.requires_grad_()
    b.requires_grad_()
    loss = clipfast.siglip_loss(x, y, s, b, backend="cpu")
    assert torch.isnan(loss)
    grads = torch.autograd.grad(loss, (x, y, s, b))
    assert all(torch.isnan(g).any() for g in grads)


def test_siglip_cpu_backward_without_bias():
    # No bias: no bias gradient even when asked for, the rest as the formula's.
    from clipfast.backends._ops import KernelOptions
    from clipfast.backends.cpu import cpu_siglip_backward, cpu_siglip_forward

    x, y = make_features(9, 5, torch.float64, "cpu", seed=1)
    s = torch.tensor(10.0, dtype=torch.float64)
    options = KernelOptions(normalize=True, allow_tf32=True, block=0)
    _, stats = cpu_siglip_forward(x, y, s, None, options)
    grads = cpu_siglip_backward(torch.tensor(1.0, dtype=torch.float64), x, y, s, None, stats,
                                options, True, True, True, True)
    assert grads[3] is None
    want = loss_and_grads(lambda *a: reference_siglip_loss(*a, normalize=True), x, y, s, None,
                          (True, True, True, False))
    for got, key in zip(grads[:3], ("grad_image", "grad_text", "grad_scale")):
        torch.testing.assert_close(got, want[key], rtol=1e-9, atol=1e-12)


def test_siglip_cpu_results_are_bitwise_reproducible():
    # Per-row-block partials summed in order: no dependence on thread timing.
    x, y = make_features(300, 7, torch.float32, "cpu", seed=6)
    s, b = scalars(7.0, -3.0)
    runs = [loss_and_grads(lambda *a: clipfast.siglip_loss(*a, backend="cpu"), x, y, s, b,
                           (True, True, True, True)) for _ in range(5)]
    for other in runs[1:]:
        for key in runs[0]:
            torch.testing.assert_close(other[key], runs[0][key], rtol=0, atol=0)


def test_siglip_cpu_non_contiguous_inputs():
    big = torch.randn(60, 80)
    x, y = big[::2, 5:50], big.t().contiguous().t()[1::2, 7:52]
    s, b = scalars(20.0, -10.0)
    torch.testing.assert_close(clipfast.siglip_loss(x, y, s, b, backend="cpu"),
                               clipfast.siglip_loss(x, y, s, b, backend="chunked"),
                               rtol=1e-5, atol=1e-6)


def test_siglip_cpu_double_backward():
    # create_graph=True recomputes the gradient from the formula (clipfast.backends._ops).
    x, y = make_features(6, 4, torch.float64, "cpu", seed=8)
    x.requires_grad_()
    s, b = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(
        lambda x: clipfast.siglip_loss(x, y, s, b, normalize=True, backend="cpu"), (x,))


def test_siglip_cpu_compile_fullgraph():
    # The C++ call is an opaque custom operator: torch.compile traces around it.
    torch._dynamo.reset()
    x, y = make_features(10, 5, torch.float32, "cpu", seed=7)
    s, b = scalars(10.0, -10.0)

    def step(x, y, s, b):
        return clipfast.siglip_loss(x, y, s, b, normalize=True, backend="cpu")

    needs = (True, True, True, True)
    eager = loss_and_grads(step, x, y, s, b, needs)
    compiled = loss_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"),
                              x, y, s, b, needs)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=0)


@pytest.mark.parametrize("exponent", [66, 100])
def test_siglip_cpu_huge_rows(exponent):
    # Rows times 2^66 (squares past fp32's range) or 2^100 (dot products of
    # two such rows past it too) go through the CLIP backend's overflow-safe
    # norms and scaled tile operands: exactly the unit rows of the unscaled
    # features, so the loss, the text and scalar gradients are bit for bit
    # the same, and the scaled rows' gradients 2^-exponent times theirs.
    x, y = make_features(40, 16, torch.float32, "cpu", seed=3)
    huge = x.clone()
    huge[::3] *= 2.0 ** exponent
    s, b = scalars(10.0, -10.0)
    needs = (True, True, True, True)

    def run(features):
        return loss_and_grads(lambda *a: clipfast.siglip_loss(*a, normalize=True, backend="cpu"),
                              features, y, s, b, needs)

    got, want = run(huge), run(x)
    assert torch.isfinite(got["loss"])
    for key in ("loss", "grad_text", "grad_scale", "grad_bias"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    scaled = got["grad_image"].clone()
    scaled[::3] *= 2.0 ** exponent
    torch.testing.assert_close(scaled, want["grad_image"], rtol=0, atol=0)
