"""SigLIP's sigmoid loss: the reference against open_clip's formula, the
chunked backend against the reference (fp64 to 1e-9, gradcheck, the accuracy
rule in fp32/fp16/bf16), the public function and the SigLipLoss module.
The fused backends' SigLIP has its own files (test_siglip_<backend>.py); the
distributed modes are in test_distributed.py."""

import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast import SigLipLoss, siglip_loss
from clipfast.backends.reference import reference_siglip_loss

from .parity import floor_for, make_features


def open_clip_siglip(image_features, text_features, logit_scale, logit_bias=None,
                     negative_only=False):
    """open_clip's SigLipLoss._loss restated: N x N labels, logsigmoid, / N."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n = image_features.shape[0]
    labels = -torch.ones(n, n, dtype=image_features.dtype)
    if not negative_only:
        labels = 2 * torch.eye(n, dtype=image_features.dtype) + labels
    return -F.logsigmoid(labels * logits).sum() / n


def _inputs(n, d, dtype=torch.float64, scale=10.0, bias=-10.0, seed=0, correlated=True):
    x, y = make_features(n, d, dtype, "cpu", seed, correlated=correlated)
    s = torch.tensor(scale, dtype=torch.float64)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    return x, y, s, b


def _loss_and_grads(fn, x, y, s, b):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, y, s, b)]
    loss = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    return [loss.detach()] + list(torch.autograd.grad(loss, wrt))


@pytest.mark.parametrize("positives", [True, False])
@pytest.mark.parametrize("bias", [None, -10.0, 3.0])
def test_reference_is_open_clips_formula(positives, bias):
    x, y, s, b = _inputs(13, 9, bias=bias)
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    got = _loss_and_grads(lambda *a: reference_siglip_loss(*a, positives=positives), x, y, s, b)
    want = _loss_and_grads(lambda *a: open_clip_siglip(*a, negative_only=not positives), x, y, s, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (7, 65), (97, 16), (130, 7)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("positives", [True, False])
@pytest.mark.parametrize("scale,bias", [(1.0, None), (10.0, -10.0), (100.0, 3.0)])
def test_chunked_matches_reference_fp64(n, d, normalize, positives, scale, bias):
    x, y, s, b = _inputs(n, d, scale=scale, bias=bias, seed=n + d)
    got = _loss_and_grads(lambda *a: siglip_loss(
        *a, normalize=normalize, backend="chunked", chunk_elements=max(1, 3 * n),
        positives=positives), x, y, s, b)
    want = _loss_and_grads(lambda *a: reference_siglip_loss(*a, normalize, positives), x, y, s, b)
    for name, g, w in zip(["loss", "x", "y", "scale", "bias"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("normalize,with_bias", [(True, True), (False, False), (True, False)])
def test_chunked_gradcheck_and_gradgradcheck(normalize, with_bias):
    x, y, s, b = _inputs(6, 4, scale=3.0, bias=-1.5 if with_bias else None, seed=3)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, y, s, b)]

    def fn(x, y, s, b):
        return siglip_loss(x, y, s, b, normalize=normalize, backend="chunked", chunk_elements=8)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d,scale,bias", [(97, 40, 10.0, -10.0), (123, 17, 100.0, 2.0)])
def test_chunked_accuracy_rule(dtype, n, d, scale, bias):
    # Error against fp64 at most 2x the plain formula's in the same dtype.
    x, y, s, b = _inputs(n, d, torch.float32, scale=scale, bias=bias, seed=n)
    x, y = x.to(dtype), y.to(dtype)
    s32, b32 = s.float(), b.float()
    got = _loss_and_grads(lambda *a: siglip_loss(*a, normalize=True, backend="chunked"),
                          x, y, s32, b32)
    same = _loss_and_grads(lambda *a: reference_siglip_loss(*a, True), x, y, s32, b32)
    truth = _loss_and_grads(lambda *a: reference_siglip_loss(*a, True),
                            x.double(), y.double(), s, b)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, g, r, t in zip(["loss", "x", "y", "scale", "bias"], got, same, truth):
        err = (g.double() - t).abs().max().item()
        ref_err = (r.double() - t).abs().max().item()
        floor = floor_for(dtype) * max(t.abs().max().item(), 1.0)
        assert err <= 2 * ref_err + floor, f"{name}: {err:.3e} vs reference {ref_err:.3e}"


def test_large_logits_stay_finite_and_exact():
    # |L| up to ~110: logsigmoid and sigmoid must not overflow or cancel.
    x, y, s, b = _inputs(9, 5, scale=100.0, bias=10.0, correlated=False)
    got = _loss_and_grads(lambda *a: siglip_loss(*a, normalize=True, backend="chunked"), x, y, s, b)
    want = _loss_and_grads(lambda *a: reference_siglip_loss(*a, True), x, y, s, b)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_nan_features_give_nan_loss(backend):
    x, y, s, b = _inputs(5, 4)
    x[2, 1] = float("nan")
    assert torch.isnan(siglip_loss(x, y, s, b, backend=backend))


def test_bias_gradient_is_the_sum_of_logit_gradients():
    # Unlike CLIP's softmax, the sigmoid loss depends on the bias.
    x, y, s, b = _inputs(8, 3, bias=-4.0)
    _, _, _, _, grad_b = _loss_and_grads(lambda *a: siglip_loss(*a, backend="chunked"), x, y, s, b)
    assert grad_b.abs() > 1e-3


def test_inputs_not_modified_and_errors_name_the_argument():
    x, y, s, b = _inputs(6, 4)
    copies = [t.clone() for t in (x, y, s, b)]
    siglip_loss(x, y, s, b, normalize=True, backend="chunked")
    for t, c in zip((x, y, s, b), copies):
        assert torch.equal(t, c)
    with pytest.raises(ValueError, match="batch size mismatch"):
        siglip_loss(x, y[:5], s, b)
    with pytest.raises(ValueError, match="logit_scale"):
        siglip_loss(x, y, -1.0, b)
    with pytest.raises(ValueError, match="backend must be one of"):
        siglip_loss(x, y, s, b, backend="fast")
    with pytest.raises(ValueError, match="chunk_elements"):
        siglip_loss(x, y, s, b, backend="chunked", chunk_elements=0)


def test_module_matches_open_clip_and_its_api():
    x, y, s, b = _inputs(11, 6, dtype=torch.float32, bias=-10.0)
    loss_fn = SigLipLoss()
    assert loss_fn.dist_impl == "bidir" and loss_fn.normalize is False
    out = loss_fn(x, y, s.float(), b.float(), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    want = open_clip_siglip(x.double(), y.double(), s, b)
    torch.testing.assert_close(out["contrastive_loss"].double(), want, rtol=1e-5, atol=1e-6)
    labels = loss_fn.get_ground_truth(x.device, x.dtype, 4)
    assert torch.equal(labels, 2 * torch.eye(4) - 1)
    assert torch.equal(loss_fn.get_ground_truth(x.device, x.dtype, 3, negative_only=True),
                       -torch.ones(3, 3))
    logits = loss_fn.get_logits(x, y, s.float(), b.float())
    torch.testing.assert_close(logits, s.float() * x @ y.T + b.float())
    assert "normalize=False" in repr(loss_fn)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(TypeError, match="normalize"):
        SigLipLoss(normalize="yes")


def test_siglip_backend_without_the_loss_is_named():
    x, y, s, b = _inputs(4, 3, dtype=torch.float32)
    # auto takes a backend that has SigLIP; on this CPU it is chunked.
    assert torch.isfinite(siglip_loss(x, y, s, b))
    assert "siglip_loss" in clipfast.__all__ and "SigLipLoss" in clipfast.__all__


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, y, s, b = _inputs(10, 5, dtype=torch.float32)

    def step(x, y, s, b):
        return siglip_loss(x, y, s, b, normalize=True, backend="chunked")

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        results.append(_loss_and_grads(fn, x, y, s.float(), b.float()))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


def test_triton_panel_size_reaches_the_backward():
    # siglip_loss(panel_size=) is the triton backward's panel side: several
    # panels give the one-panel result; a bad value is refused by name.
    x, y, s, b = _inputs(40, 8, dtype=torch.float32)
    s, b = s.float(), b.float()
    one = _loss_and_grads(lambda *a: siglip_loss(*a, backend="triton", allow_tf32=False), x, y, s, b)
    many = _loss_and_grads(lambda *a: siglip_loss(*a, backend="triton", allow_tf32=False,
                                                  panel_size=16), x, y, s, b)
    for g, w in zip(many, one):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="panel_size"):
        siglip_loss(x, y, s, b, backend="triton", panel_size=0)
