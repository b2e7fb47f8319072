import math

import pytest
import torch

import clipfast
from clipfast import clip_loss

BACKENDS = ["reference", "chunked", "triton", "hybrid", "cpu"]


def _features(n=5, d=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


# ------------------------------ bad input ---------------------------------- #

BAD_INPUTS = [
    # (description, kwargs builder, exception, words the message must contain)
    ("3-D image features", lambda x, y: (x[None], y, 1.0), ValueError, ["image_features", "2-D", "(1, 5, 4)"]),
    ("1-D text features", lambda x, y: (x, y[0], 1.0), ValueError, ["text_features", "2-D", "(4,)"]),
    ("batch mismatch", lambda x, y: (x, y[:3], 1.0), ValueError, ["batch", "(5, 4)", "(3, 4)"]),
    ("dim mismatch", lambda x, y: (x, y[:, :3], 1.0), ValueError, ["dim", "(5, 4)", "(5, 3)"]),
    ("integer features", lambda x, y: (x.long(), y, 1.0), TypeError, ["image_features", "torch.int64"]),
    ("bool features", lambda x, y: (x, y > 0, 1.0), TypeError, ["text_features", "torch.bool"]),
    ("numpy features", lambda x, y: (x.numpy(), y, 1.0), TypeError, ["image_features", "ndarray"]),
    ("zero scale", lambda x, y: (x, y, 0.0), ValueError, ["logit_scale", "> 0", "0.0"]),
    ("negative scale", lambda x, y: (x, y, torch.tensor(-2.0)), ValueError, ["logit_scale", "-2.0"]),
    ("nan scale", lambda x, y: (x, y, float("nan")), ValueError, ["logit_scale", "nan"]),
    ("inf scale", lambda x, y: (x, y, float("inf")), ValueError, ["logit_scale", "inf"]),
    ("vector scale", lambda x, y: (x, y, torch.ones(2)), ValueError, ["logit_scale", "(2,)"]),
    ("integer scale tensor", lambda x, y: (x, y, torch.tensor(3)), TypeError, ["logit_scale", "torch.int64"]),
    ("string scale", lambda x, y: (x, y, "10"), TypeError, ["logit_scale", "str"]),
    ("empty batch", lambda x, y: (x[:0], y[:0], 1.0), ValueError, ["empty", "(0, 4)"]),
    ("empty dim", lambda x, y: (x[:, :0], y[:, :0], 1.0), ValueError, ["(5, 0)"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_with_a_clear_message(case, backend):
    _, build, exc, words = case
    x, y = _features()
    args = build(x, y)
    with pytest.raises(exc) as info:
        clip_loss(*args, backend=backend)
    for word in words:
        assert word in str(info.value), f"{word!r} not in message: {info.value}"


@pytest.mark.parametrize("bias", [float("nan"), float("-inf"), torch.ones(3)])
def test_bad_bias(bias):
    x, y = _features()
    with pytest.raises(ValueError, match="logit_bias"):
        clip_loss(x, y, 1.0, logit_bias=bias)


def test_unknown_backend():
    x, y = _features()
    with pytest.raises(ValueError, match="backend must be one of"):
        clip_loss(x, y, 1.0, backend="cudnn")


def test_device_mismatch_is_reported():
    # The meta device stands in for a second device on a CPU-only machine.
    x, y = _features()
    with pytest.raises(ValueError, match="same device"):
        clip_loss(x, y.to("meta"), 1.0)
    with pytest.raises(ValueError, match="logit_scale is on meta"):
        clip_loss(x, y, torch.tensor(1.0, device="meta"))


def test_triton_rejects_fp64_and_cpu_without_interpreter(monkeypatch):
    x, y = _features(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        clip_loss(x, y, 1.0, backend="triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            clip_loss(x.float(), y.float(), 1.0, backend="triton")


def test_auto_backend_resolution():
    # On the CPU the shipped measurements say chunked (tests/test_autoselect.py
    # covers the table rule itself).
    x, y = _features()
    inputs = clipfast._inputs.check_inputs(x, y, 1.0)
    assert clipfast.resolve_backend("auto", inputs) == "chunked"
    if torch.cuda.is_available():
        inputs = clipfast._inputs.check_inputs(x.cuda(), y.cuda(), 1.0)
        assert clipfast.resolve_backend("auto", inputs) in ("triton", "cuda", "chunked")


# ------------------------- robustness and semantics ------------------------ #


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    x, y = _features(7, 6)
    x.requires_grad_()
    y.requires_grad_()
    s = torch.tensor(12.0, requires_grad=True)
    b = torch.tensor(0.5, requires_grad=True)
    before = [t.detach().clone() for t in (x, y, s, b)]
    clip_loss(x, y, s, logit_bias=b, backend=backend).backward()
    for t, old in zip((x, y, s, b), before):
        assert torch.equal(t.detach(), old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_feature_rows_give_finite_loss_and_grads(backend):
    x, y = _features(6, 5)
    x[1] = 0
    y[4] = 0
    x.requires_grad_()
    y.requires_grad_()
    loss = clip_loss(x, y, 50.0, backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    ref = clip_loss(x.detach(), y.detach(), 50.0, backend="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_scale_is_finite_and_correct(backend):
    x, y = _features(9, 8)
    x.requires_grad_()
    s = torch.tensor(1e4, requires_grad=True)
    loss = clip_loss(x, y, s, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(s.grad)
    ref = clip_loss(x.detach().double(), y.double(), 1e4, backend="reference")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["image", "text"])
def test_nan_features_give_nan_loss(backend, where):
    x, y = _features(6, 5)
    (x if where == "image" else y)[3, 2] = float("nan")
    assert torch.isnan(clip_loss(x, y, 10.0, backend=backend))
    assert torch.isnan(clip_loss(x, y, 10.0, backend=backend, normalize=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reaches_the_bias_gradient(backend):
    x, y = _features(6, 5)
    x[0, 0] = float("nan")
    b = torch.tensor(0.0, requires_grad=True)
    clip_loss(x, y, 10.0, logit_bias=b, backend=backend).backward()
    assert torch.isnan(b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,)])
def test_scale_and_bias_shapes_and_float_scale(backend, shape):
    x, y = _features(8, 6)
    s = torch.full(shape, 7.0, requires_grad=True)
    b = torch.full(shape, -1.0, requires_grad=True)
    loss = clip_loss(x, y, s, logit_bias=b, backend=backend)
    loss.backward()
    assert s.grad.shape == s.shape and b.grad.shape == b.shape
    assert b.grad.abs().max().item() < 1e-6  # the loss is shift-invariant
    as_float = clip_loss(x, y, 7.0, logit_bias=-1.0, backend=backend)
    torch.testing.assert_close(loss.detach(), as_float)


@pytest.mark.parametrize("dtype,loss_dtype", [
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_loss_dtype(dtype, loss_dtype):
    x, y = _features(dtype=dtype)
    assert clip_loss(x, y, 3.0, backend="chunked").dtype == loss_dtype
    assert clip_loss(x, y, 3.0, backend="reference").dtype == loss_dtype


def test_normalize_false_uses_raw_features():
    x, y = _features(6, 3)
    a = clip_loss(x, y, 2.0, normalize=False, backend="chunked")
    b = clip_loss(x * 3, y, 2.0, normalize=False, backend="chunked")
    c = clip_loss(x * 3, y, 2.0, normalize=True, backend="chunked")
    assert not math.isclose(a.item(), b.item())
    torch.testing.assert_close(c, clip_loss(x, y, 2.0, backend="chunked"))
