"""Hard negatives, multiple positives, label smoothing and one-direction
InfoNCE (clipfast/infonce.py) on every backend that has them, against the
materialised formula with F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast import clip_loss, info_nce_loss
from clipfast.backends import cpu as cpu_backend, cuda as cuda_backend
from clipfast.infonce import reference_info_nce_loss
from clipfast.backends.reference import reference_clip_loss

from .parity import floor_for, make_features, requires_cuda


@pytest.fixture(autouse=True)
def cuda_emulation(monkeypatch):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")


def _problem(n, d, dtype, negatives, groups, seed=0):
    x, y = make_features(n, d, torch.float32, "cpu", seed)
    g = torch.Generator().manual_seed(seed + 1)
    neg = None
    if negatives == "shared":
        neg = torch.randn(max(1, n // 2) + 1, d, generator=g)
    elif negatives == "per_query":
        neg = torch.randn(n, 3, d, generator=g)
    labels = None
    if groups:
        # About three pairs per group, as duplicate captions make them.
        labels = torch.randint(0, max(1, n // 3), (n,), generator=g)
    return x.to(dtype), y.to(dtype), None if neg is None else neg.to(dtype), labels


def _loss_and_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    loss = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    return [loss.detach()] + list(torch.autograd.grad(loss, wrt))


VARIANTS = [
    # (negatives, groups, label_smoothing, symmetric)
    (None, True, 0.0, True),
    (None, False, 0.1, True),
    (None, True, 0.2, False),
    (None, False, 0.0, False),
    ("shared", False, 0.0, False),
    ("shared", True, 0.1, True),
    ("per_query", False, 0.0, False),
    ("per_query", True, 0.3, True),
]


def _run(backend, n, d, dtype, negatives, groups, smoothing, symmetric, scale=20.0, bias=None,
         normalize=True, truth=False):
    x, y, neg, labels = _problem(n, d, dtype, negatives, groups, seed=n + d)
    s = torch.tensor(scale)
    b = None if bias is None else torch.tensor(bias)
    if truth:
        x, y, s = x.double(), y.double(), s.double()
        neg = None if neg is None else neg.double()
        b = None if b is None else b.double()

    def fn(x, y, s, b, neg):
        if backend == "formula":
            return reference_info_nce_loss(
                x, y, s, b, normalize=normalize, negative_features=neg, labels=labels,
                label_smoothing=smoothing, symmetric=symmetric)
        return info_nce_loss(x, y, s, logit_bias=b, negative_features=neg, labels=labels,
                             label_smoothing=smoothing, symmetric=symmetric, normalize=normalize,
                             backend=backend, allow_tf32=False, chunk_elements=3 * n,
                             panel_size=16 if backend in ("triton", "hybrid") else None)

    return _loss_and_grads(fn, (x, y, s, b, neg))


def _assert_rule(got, same, truth, dtype, what):
    for i, (g, r, t) in enumerate(zip(got, same, truth)):
        err = (g.double() - t).abs().max().item()
        ref_err = (r.double() - t).abs().max().item()
        floor = floor_for(dtype) * max(t.abs().max().item(), 1.0)
        assert err <= 2 * ref_err + floor, (
            f"{what} output {i}: error {err:.3e} vs formula's {ref_err:.3e} + floor {floor:.1e}")


@pytest.mark.parametrize("negatives,groups,smoothing,symmetric", VARIANTS)
@pytest.mark.parametrize("n,d", [(1, 3), (7, 65), (97, 16)])
@pytest.mark.parametrize("backend", ["reference", "chunked", "triton", "hybrid", "cpu"])
def test_parity_fp32(backend, n, d, negatives, groups, smoothing, symmetric):
    args = (n, d, torch.float32, negatives, groups, smoothing, symmetric)
    got = _run(backend, *args, bias=-3.0)
    same = _run("formula", *args, bias=-3.0)
    truth = _run("formula", *args, bias=-3.0, truth=True)
    _assert_rule(got, same, truth, torch.float32, f"{backend} {args}")


@pytest.mark.parametrize("negatives,groups,smoothing,symmetric", VARIANTS)
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_fp64_exact_and_gradcheck(negatives, groups, smoothing, symmetric, normalize):
    x, y, neg, labels = _problem(6, 4, torch.float64, negatives, groups, seed=3)
    s = torch.tensor(3.0, dtype=torch.float64)
    b = torch.tensor(0.5, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, y, s, b, neg)]

    def fused(x, y, s, b, neg):
        return info_nce_loss(x, y, s, logit_bias=b, negative_features=neg, labels=labels,
                             label_smoothing=smoothing, symmetric=symmetric, normalize=normalize,
                             backend="chunked", chunk_elements=7)

    def formula(x, y, s, b, neg):
        return reference_info_nce_loss(x, y, s, b, normalize=normalize, negative_features=neg,
                                       labels=labels, label_smoothing=smoothing,
                                       symmetric=symmetric)

    for g, w in zip(_loss_and_grads(fused, leaves), _loss_and_grads(formula, leaves)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(fused, leaves)


@pytest.mark.parametrize("backend", ["chunked", "cpu", "cuda", "triton", "hybrid"])
@pytest.mark.parametrize("groups,smoothing", [(True, 0.0), (False, 0.15), (True, 0.1)])
def test_clip_loss_with_labels_and_smoothing_on_every_backend(backend, groups, smoothing):
    if backend == "cpu" and not cpu_backend.available():
        pytest.fail("the cpu backend is not built")
    if backend == "cuda" and not cuda_backend.emulation_available():
        pytest.fail("the CUDA emulation is not built")
    args = (24, 20, torch.float32, None, groups, smoothing, True)
    x, y, _, labels = _problem(*args[:5])
    s = torch.tensor(30.0)

    def fused(x, y, s):
        return clip_loss(x, y, s, labels=labels, label_smoothing=smoothing, backend=backend,
                         allow_tf32=False)

    def formula(x, y, s):
        return reference_info_nce_loss(x, y, s, labels=labels, label_smoothing=smoothing,
                                       symmetric=True)

    got = _loss_and_grads(fused, (x, y, s))
    same = _loss_and_grads(formula, (x, y, s))
    truth = _loss_and_grads(formula, (x.double(), y.double(), s.double()))
    _assert_rule(got, same, truth, torch.float32, backend)


def test_defaults_are_the_clip_loss():
    x, y = make_features(11, 7, torch.float64, "cpu", seed=2)
    s = torch.tensor(9.0, dtype=torch.float64)
    torch.testing.assert_close(reference_info_nce_loss(x, y, s, symmetric=True),
                               reference_clip_loss(x, y, s), rtol=1e-14, atol=0)
    torch.testing.assert_close(info_nce_loss(x, y, s, symmetric=True, backend="chunked"),
                               reference_clip_loss(x, y, s), rtol=1e-12, atol=0)


def test_groups_of_one_are_the_one_hot_loss():
    x, y = make_features(9, 5, torch.float64, "cpu", seed=4)
    s = torch.tensor(9.0, dtype=torch.float64)
    torch.testing.assert_close(clip_loss(x, y, s, labels=torch.arange(9), backend="chunked"),
                               clip_loss(x, y, s, backend="chunked"), rtol=1e-12, atol=0)


def mnrl(anchors, positives, negatives, scale=20.0):
    """sentence-transformers' MultipleNegativesRankingLoss (cos_sim, scale 20)
    restated: every anchor against all positives and all negatives of the batch."""
    candidates = torch.cat([positives, negatives])
    scores = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T * scale
    return F.cross_entropy(scores, torch.arange(anchors.shape[0]))


@pytest.mark.parametrize("backend", ["chunked", "triton", "hybrid", "reference", "cpu"])
def test_multiple_negatives_ranking_loss_drop_in(backend):
    anchors, positives = make_features(19, 12, torch.float32, "cpu", seed=5)
    negatives = torch.randn(19, 12, generator=torch.Generator().manual_seed(6))

    def fused(a, p, n):
        return info_nce_loss(a, p, 20.0, negative_features=n, backend=backend, allow_tf32=False)

    got = _loss_and_grads(fused, (anchors, positives, negatives))
    same = _loss_and_grads(mnrl, (anchors, positives, negatives))
    truth = _loss_and_grads(mnrl, (anchors.double(), positives.double(), negatives.double()))
    _assert_rule(got, same, truth, torch.float32, backend)


def test_learnable_scale_and_bias_gradients():
    # The scale gets its gradient; the bias cancels in every softmax row: its
    # gradient is an exact zero.
    x, y, neg, labels = _problem(10, 6, torch.float64, "per_query", True, seed=8)
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    loss = info_nce_loss(x, y, s, logit_bias=b, negative_features=neg, labels=labels,
                         symmetric=True, backend="chunked")
    grad_s, grad_b = torch.autograd.grad(loss, (s, b))
    assert grad_s.abs() > 1e-6 and grad_b.abs() < 1e-12


def test_bad_options_name_the_argument():
    x, y = make_features(6, 4, torch.float32, "cpu", seed=0)
    cases = [
        (dict(negative_features=torch.randn(3, 5)), ValueError, "negative_features"),
        (dict(negative_features=torch.randn(5, 2, 4)), ValueError, "negative_features"),
        (dict(negative_features=[1.0]), TypeError, "negative_features"),
        (dict(labels=torch.arange(5)), ValueError, "labels"),
        (dict(labels=torch.zeros(6)), TypeError, "labels"),
        (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            info_nce_loss(x, y, 10.0, **kwargs)
        with pytest.raises(exc, match=match):
            clip_loss(x, y, 10.0, **kwargs)


@pytest.mark.parametrize("negatives,symmetric", [(None, False), ("shared", True),
                                                 ("per_query", False)])
def test_cuda_runs_the_one_direction_rows_on_its_stand_in(negatives, symmetric):
    # Every backend has the row loss: cuda's runs Triton's row kernels on the
    # same device (here the interpreter on the emulation's CPU tensors).
    if not cuda_backend.emulation_available():
        pytest.fail("the CUDA emulation is not built")
    x, y, neg, _ = _problem(9, 6, torch.float32, negatives, False, seed=2)
    got = info_nce_loss(x, y, 10.0, negative_features=neg, symmetric=symmetric, backend="cuda")
    want = info_nce_loss(x, y, 10.0, negative_features=neg, symmetric=symmetric,
                         backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inputs_not_modified_and_nan_propagates():
    x, y, neg, labels = _problem(8, 4, torch.float32, "shared", True)
    copies = [t.clone() for t in (x, y, neg, labels)]
    info_nce_loss(x, y, 10.0, negative_features=neg, labels=labels, label_smoothing=0.1,
                  backend="chunked")
    for t, c in zip((x, y, neg, labels), copies):
        assert torch.equal(t, c)
    neg[0, 0] = float("nan")
    assert torch.isnan(info_nce_loss(x, y, 10.0, negative_features=neg, backend="chunked"))
    assert "info_nce_loss" in clipfast.__all__


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "hybrid", "chunked"])
@pytest.mark.parametrize("negatives,groups,smoothing,symmetric", VARIANTS)
def test_gpu_parity_bf16(backend, negatives, groups, smoothing, symmetric):
    n, d = 1025, 128
    x, y, neg, labels = _problem(n, d, torch.bfloat16, negatives, groups)
    tensors = [t.cuda() if t is not None else None for t in (x, y, torch.tensor(20.0), None, neg)]
    labels = None if labels is None else labels.cuda()
    kwargs = dict(labels=labels, label_smoothing=smoothing, symmetric=symmetric)

    def fused(x, y, s, b, neg):
        return info_nce_loss(x, y, s, negative_features=neg, backend=backend, **kwargs)

    def formula(x, y, s, b, neg):
        return reference_info_nce_loss(x, y, s, negative_features=neg, **kwargs)

    got = _loss_and_grads(fused, tensors)
    same = _loss_and_grads(formula, tensors)
    truth = _loss_and_grads(formula, [t.double() if t is not None else None for t in tensors])
    _assert_rule(got, same, truth, torch.bfloat16, backend)


@requires_cuda
def test_gpu_memory_with_hard_negatives_is_linear():
    # N = 65536 queries against N keys and N shared negatives in bf16: the
    # logits (2 N^2 = 16 GiB in bf16) never exist.
    n, d = 65536, 512
    x, y = make_features(n, d, torch.bfloat16, "cuda", seed=1)
    neg = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    for t in (x, y, neg):
        t.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = info_nce_loss(x, y, 20.0, negative_features=neg, labels=torch.arange(n, device="cuda") // 4,
                         label_smoothing=0.1, symmetric=True, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = 3 * n * d * 2
    assert torch.isfinite(loss)
    # Linear in N: the three gradients, the [keys; negatives] copy, and the
    # fp32 unit rows and group means autograd keeps for the label terms
    # (about 8x the gradients here), against 16 GiB of logits.
    assert extra <= 8 * grad_bytes, f"peak extra {extra / 2**30:.2f} GiB vs grads {grad_bytes / 2**30:.2f} GiB"


def test_compile_fullgraph_with_labels_and_negatives():
    # Group ids of any values, per-query negatives, smoothing: static shapes
    # only, so one graph; equal to eager.
    torch._dynamo.reset()
    x, y, neg, _ = _problem(20, 8, torch.float32, "per_query", False, seed=9)
    labels = torch.tensor([5, 3, 5, 100, -2] * 4)

    def step(x, y, neg):
        return (clip_loss(x, y, 10.0, labels=labels, label_smoothing=0.1, backend="chunked")
                + info_nce_loss(x, y, 20.0, negative_features=neg, backend="chunked"))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for eager, fused in zip(_loss_and_grads(step, (x, y, neg)), _loss_and_grads(compiled, (x, y, neg))):
        torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-7)
