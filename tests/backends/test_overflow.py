"""Features whose squared norms overflow (or underflow) the dtype.

With normalize=True the loss depends only on the rows' directions, so fp32
rows of size 1e20 or 1e30 (squared norms past fp32's 3.4e38) must give the
loss of their unit rows, and gradients scaled by 1 / |x|. Backends used to
return log N with zero gradients (the norm overflowed to inf) or NaN (the
raw dot products overflowed). Tiny rows (1e-30, below eps = 1e-12) are
clamped as F.normalize clamps them: x / eps.

The truth is the plain formula in fp64 on the same inputs (fp64 squares them
without overflow; for fp64 inputs, on the unit rows). Every quantity is
judged by the parity rule (tests/parity.py): error at most twice the plain
reference's in the input dtype, plus a floor of a few ulps. Gradients are
compared after multiplying each row by max(|x|, eps), which makes them
scale-free (O(s / N) at any magnitude).
"""

import math

import pytest
import torch

from clipfast import clip_loss
from clipfast.backends import cpu as cpu_backend, cuda as cuda_backend

from ..parity import _loss_and_grads, floor_for

EPS = 1e-12
SCALE = 30.0

# Powers of two, so scaled rows are exact and fp64 unit rows are the truth.
MAGNITUDES = {"1e20": 2.0 ** 66, "1e30": 2.0 ** 100, "1e-30": 2.0 ** -100}


def _backends():
    cpu = pytest.mark.skipif(not cpu_backend.available(), reason="clipfast._cpu is not built")
    emulated = pytest.mark.skipif(not cuda_backend.emulation_available(),
                                  reason="clipfast._cuda_emulated is not built")
    return [
        pytest.param("reference", torch.float32, {}, id="reference"),
        pytest.param("chunked", torch.float32, {}, id="chunked"),
        pytest.param("cpu", torch.float32, {}, id="cpu", marks=cpu),
        # The interpreter: fp32 (its bf16 dot is refused), IEEE products.
        pytest.param("triton", torch.float32, dict(allow_tf32=False), id="triton"),
        pytest.param("hybrid", torch.float32, dict(allow_tf32=False), id="hybrid-fp32"),
        pytest.param("hybrid", torch.bfloat16, {}, id="hybrid-bf16"),
        pytest.param("cuda", torch.float32, dict(allow_tf32=False), id="cuda-emulated-fp32",
                     marks=emulated),
        pytest.param("cuda", torch.bfloat16, {}, id="cuda-emulated-bf16", marks=emulated),
    ]


@pytest.fixture(autouse=True)
def emulation(monkeypatch):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")


def _features(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = x + 0.8 * torch.randn(n, d, generator=gen)
    return x, y


def _truth(x, y, s, b, normalize):
    """Loss and gradients of the plain formula in fp64 (F.normalize's eps)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, y, s)]
    xd, yd, sd = leaves
    if normalize:
        xd = xd / xd.norm(dim=1, keepdim=True).clamp_min(EPS)
        yd = yd / yd.norm(dim=1, keepdim=True).clamp_min(EPS)
    logits = sd * xd @ yd.t() + b
    labels = torch.arange(x.shape[0])
    loss = (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    return {"loss": loss.detach(), **dict(zip(("grad_image", "grad_text", "grad_scale"),
                                              torch.autograd.grad(loss, leaves)))}


def _row_scaled(grad, features):
    # d loss / dx_i scales as 1 / max(|x_i|, eps): undo it.
    f = features.double()
    top = f.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)  # fp64 norms past 1e154 too
    norms = (top * (f / top).norm(dim=1, keepdim=True)).clamp_min(EPS)
    return grad.double() * norms


def _check(backend, x, y, kwargs, truth=None, bias=-1.0):
    s = torch.tensor(SCALE)
    b = torch.tensor(bias)
    needs = (True, True, True, False)
    got = _loss_and_grads(x, y, s, b, True, needs, backend, **kwargs)
    same = _loss_and_grads(x, y, s, b, True, needs, "reference")
    truth = truth or _truth(x, y, s, bias, True)
    n = x.shape[0]
    assert torch.isfinite(got["loss"]), f"{backend}: loss {got['loss']}"
    for key in ("loss", "grad_image", "grad_text", "grad_scale"):
        t, g, r = truth[key].double(), got[key].double(), same[key].double()
        if key in ("grad_image", "grad_text"):
            feats = x if key == "grad_image" else y
            t, g, r = (_row_scaled(v, feats) for v in (t, g, r))
            magnitude = max(t.abs().max().item(), SCALE / n)
        else:
            magnitude = max(t.abs().max().item(), 1.0)
        assert torch.isfinite(g).all(), f"{backend} {key}: not finite"
        err = (g - t).abs().max().item()
        ref_err = (r - t).abs().max().item()
        floor = floor_for(x.dtype) * magnitude
        if key in ("loss", "grad_scale"):
            floor += torch.finfo(x.dtype).eps * (SCALE + abs(bias))
        assert err <= 2 * ref_err + floor, (
            f"{backend} {key}: error {err:.3e} vs fp64 exceeds 2 x reference error {ref_err:.3e} "
            f"+ floor {floor:.3e} ({x.dtype}, largest |x_ij| {_largest_entry(x):.1e})")
    return got


def _largest_entry(x):
    return x.double().abs().max().item()


@pytest.mark.parametrize("magnitude", list(MAGNITUDES.values()), ids=list(MAGNITUDES))
@pytest.mark.parametrize("backend,dtype,kwargs", _backends())
def test_scaled_rows_give_the_loss_of_their_directions(backend, dtype, kwargs, magnitude):
    x, y = _features(23, 10, seed=1)
    x, y = (x * magnitude).to(dtype), (y * magnitude).to(dtype)
    got = _check(backend, x, y, kwargs)
    if magnitude > 1:
        # The loss is that of the unit rows themselves (in fp64: at most the
        # rounding of the input dtype away).
        unit = _truth(x.double() / magnitude, y.double() / magnitude, torch.tensor(SCALE), -1.0,
                      True)["loss"]
        assert got["loss"].item() == pytest.approx(unit.item(), rel=1e-4 if dtype == torch.float32
                                                   else 3e-2)
    else:
        # Rows below eps are x / eps: every logit ~1e-18 s, the loss log N.
        assert got["loss"].item() == pytest.approx(math.log(x.shape[0]), rel=1e-5)


MIXES = {
    # Exploded rows among ordinary ones (one sample's features blowing up).
    "huge among ordinary": [1.0, 2.0 ** 66, 2.0 ** 100, 2.0 ** 3, 2.0 ** -3],
    # Rows below eps (dead or padded samples) among ordinary ones.
    "tiny among ordinary": [1.0, 2.0 ** -100, 2.0 ** 3, 2.0 ** -60, 2.0 ** -3],
    # Both at once, on both sides.
    "tiny and huge": [1.0, 2.0 ** 66, 2.0 ** 100, 2.0 ** 3, 2.0 ** -100],
}


def _mixed(mix, dtype):
    # 150 rows: several tiles, some with huge rows and some without (the
    # emulated CUDA tiles are 128 wide, the interpreted Triton ones 32); the
    # last 20 rows ordinary. d = 16: 16-byte rows, the CUDA kernels' cp.async
    # path (the test above, d = 10, takes the element loads).
    n = 150
    x, y = _features(n, 16, seed=2)
    row_scale = torch.tensor(MIXES[mix]).repeat(30)[:n]
    row_scale[-20:] = 1.0
    return (x * row_scale[:, None]).to(dtype), (y * row_scale.roll(2)[:, None]).to(dtype)


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("backend,dtype,kwargs", _backends())
def test_rows_of_mixed_magnitudes(backend, dtype, kwargs, mix):
    x, y = _mixed(mix, dtype)
    if backend == "triton" and mix == "tiny and huge":
        # Triton's backward folds inv_x_i inv_y_j into its gradient panel;
        # with rows below 1e-12 and past 1e19 on both sides those products
        # span more than fp32's exponent range, so the kernels return NaN
        # feature gradients instead of dropping entries (see _fold_shifts).
        # The loss and the scale gradient stay right.
        s = torch.tensor(SCALE)
        got = _loss_and_grads(x, y, s, None, True, (True, True, True, False), backend, **kwargs)
        truth = _truth(x, y, s, 0.0, True)
        assert torch.isnan(got["grad_image"]).all() and torch.isnan(got["grad_text"]).all()
        assert got["loss"].item() == pytest.approx(truth["loss"].item(), rel=1e-5)
        assert got["grad_scale"].item() == pytest.approx(truth["grad_scale"].item(), rel=1e-4,
                                                         abs=1e-6)
        return
    _check(backend, x, y, kwargs)


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
def test_fp64_rows_past_1e154(backend):
    # fp64 squares overflow past 1e154; fp64 features run on these backends.
    if backend == "cpu" and not cpu_backend.available():
        pytest.skip("clipfast._cpu is not built")
    x, y = _features(19, 7, seed=3)
    big = 2.0 ** 700
    s = torch.tensor(SCALE)
    unit = _truth(x.double(), y.double(), s, -1.0, True)
    truth = dict(unit, grad_image=unit["grad_image"] / big, grad_text=unit["grad_text"] / big)
    _check(backend, x.double() * big, y.double() * big, {}, truth=truth)


@pytest.mark.parametrize("backend,dtype,kwargs", _backends())
def test_huge_rows_without_normalize_are_never_finite(backend, dtype, kwargs):
    # Without normalisation the logits themselves overflow: inf or NaN, not a
    # number that looks like a loss.
    x, y = _features(9, 4, seed=4)
    x, y = (x * 2.0 ** 66).to(dtype), (y * 2.0 ** 66).to(dtype)
    loss = clip_loss(x, y, 1.0, normalize=False, backend=backend, **kwargs)
    assert not torch.isfinite(loss), loss
