"""The hybrid backend (clipfast/backends/hybrid): library GEMMs for the panel
products, Triton epilogues for the rest. On CPU the products run through
torch (fp32 products of the half values, exactly what a GPU's half GEMM with
an fp32 result computes) and the epilogues through Triton's interpreter; its
kernels use no tl.dot, so bf16 runs here too. With a GPU the same tests run
on CUDA and the GPU-only ones below run too.

The accuracy rule ("fp32 logits and fp32-accurate G by default"): every
quantity's error against an fp64 ground truth on the same rounded inputs is
at most twice the error of PyTorch's own fp32 math on those inputs with its
gradients rounded to the input dtype, plus a floor: a few fp32 ulps, and for
gradients returned in a half dtype half an ulp of that dtype at the largest
entry (a value a hair off the exact one may round the other way there; a
loss composed of two parts, as InfoNCE with labels, rounds twice). That is
stricter than tests/parity.py's same-dtype rule for half inputs, whose
reference computes its logits in the half dtype.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

import clipfast
from clipfast.backends.hybrid import panels

from ...parity import HAS_CUDA, make_features, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"
NAMES = ("loss", "grad_image", "grad_text", "grad_scale", "grad_bias")
FLOOR = 8 * torch.finfo(torch.float32).eps


def _run(fn, x, y, s, b, dtype, extra=None):
    """Loss and gradients of fn(x, y, s, b, extra) for inputs cast to dtype
    (scale and bias stay fp32, or fp64 for the fp64 truth)."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x.detach().to(dtype).requires_grad_(), y.detach().to(dtype).requires_grad_(),
              s.detach().to(param_dtype).requires_grad_(),
              None if b is None else b.detach().to(param_dtype).requires_grad_()]
    ex = None if extra is None else extra.detach().to(dtype).requires_grad_()
    loss = fn(*leaves, ex)
    wrt = [t for t in leaves + [ex] if t is not None]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    out = {"loss": loss.detach()}
    names = list(NAMES[1:]) + ["grad_extra"]
    for name, t, g in zip([n for n, t in zip(names, leaves + [ex]) if t is not None], wrt, grads):
        out[name] = torch.zeros_like(t) if g is None else g
    return out


def assert_hybrid_rule(fn, reference, n, d, dtype, *, bias=-2.0, scale=14.3, seed=0,
                       extra_shape=None, normalize_magnitude=True):
    """``fn`` (the hybrid loss) against ``reference`` (the same loss on the
    reference backend) by the rule above."""
    x, y = make_features(n, d, torch.float32, DEVICE, seed)
    x, y = x.to(dtype), y.to(dtype)  # the rounded inputs every side sees
    s = torch.tensor(scale, device=DEVICE)
    b = None if bias is None else torch.tensor(bias, device=DEVICE)
    extra = None
    if extra_shape is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        extra = torch.randn(*extra_shape, generator=gen).to(device=DEVICE, dtype=dtype)
    got = _run(fn, x, y, s, b, dtype, extra)
    truth = _run(reference, x, y, s, b, torch.float64, extra)
    same = _run(reference, x, y, s, b, torch.float32, extra)
    assert set(got) == set(truth)
    for key in truth:
        if key in ("grad_image", "grad_text", "grad_extra"):
            assert got[key].dtype == dtype, f"{key} dtype {got[key].dtype}, inputs {dtype}"
        t = truth[key].double()
        rounded = same[key].to(got[key].dtype).double()
        err = (got[key].double() - t).abs().max().item()
        ref_err = (rounded - t).abs().max().item()
        magnitude = max(t.abs().max().item(), 1.0 if key in ("loss", "grad_scale", "grad_bias")
                        else scale / n)
        assert math.isfinite(err), f"{key}: non-finite result"
        floor = FLOOR
        if got[key].dtype in (torch.float16, torch.bfloat16):
            floor += 0.5 * torch.finfo(got[key].dtype).eps
        assert err <= 2 * ref_err + floor * magnitude, (
            f"hybrid {key}: error {err:.3e} > 2 x fp32 PyTorch's {ref_err:.3e} + floor "
            f"({n}x{d} {dtype})")


def _clip(backend, normalize=True, **kw):
    def fn(x, y, s, b, _extra):
        return clipfast.clip_loss(x, y, s, logit_bias=b, normalize=normalize, backend=backend,
                                  **kw)
    return fn


def _siglip(backend, normalize=False, positives=True, **kw):
    def fn(x, y, s, b, _extra):
        return clipfast.siglip_loss(x, y, s, b, normalize=normalize, backend=backend,
                                    positives=positives, **kw)
    return fn


def _info_nce(backend, **kw):
    def fn(x, y, s, b, extra):
        return clipfast.info_nce_loss(x, y, s, logit_bias=b, negative_features=extra,
                                      backend=backend, **kw)
    return fn


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 19), (130, 64), (257, 48)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("normalize,bias", [(True, -2.0), (False, None)])
def test_clip_loss_by_the_rule(dtype, n, d, normalize, bias):
    # panel_size 64: several panels, a ragged last one, column splits.
    extra = dict(allow_tf32=False, panel_size=64)
    assert_hybrid_rule(_clip("hybrid", normalize, **extra), _clip("reference", normalize),
                       n, d, dtype, bias=bias, scale=14.3 if normalize else 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES[:2])
@pytest.mark.parametrize("positives", [True, False])
def test_siglip_by_the_rule(dtype, n, d, positives):
    assert_hybrid_rule(_siglip("hybrid", True, positives, allow_tf32=False, panel_size=48),
                       _siglip("reference", True, positives), n, d, dtype, bias=-10.0,
                       scale=10.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["asymmetric", "shared negatives", "per-query negatives",
                                  "labels and smoothing"])
def test_info_nce_rows_by_the_rule(dtype, case):
    n, d = 61, 24
    kwargs, extra_shape = {}, None
    if case == "shared negatives":
        extra_shape = (23, d)
    elif case == "per-query negatives":
        extra_shape = (n, 3, d)
    elif case == "labels and smoothing":
        kwargs = dict(labels=torch.arange(n, device=DEVICE) // 3, label_smoothing=0.1,
                      symmetric=True)
    assert_hybrid_rule(_info_nce("hybrid", panel_size=16, allow_tf32=False, **kwargs),
                       _info_nce("reference", **kwargs), n, d, dtype, bias=None,
                       scale=20.0, extra_shape=extra_shape)


def test_a_ragged_last_panel_with_more_column_splits():
    # 33 queries in panels of 17 against 2000 columns: the first panel has two
    # row blocks, the last one: more column splits there (the partials'
    # buffer must grow for it).
    q, k = make_features(33, 8, torch.float32, DEVICE, seed=7)
    negatives = torch.randn(1967, 8, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    got = clipfast.info_nce_loss(q, k, 10.0, negative_features=negatives, backend="hybrid",
                                 panel_size=17, allow_tf32=False)
    want = clipfast.info_nce_loss(q.double(), k.double(), 10.0,
                                  negative_features=negatives.double(), backend="reference")
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_fp64_is_refused_naming_what_to_use():
    # The hybrid backend computes in fp32 at most: fp64 features get a clear
    # TypeError naming what to use instead.
    x = torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='hybrid' supports float16, bfloat16 and "
                                        "float32 features.*chunked"):
        clipfast.clip_loss(x, x, 2.0, backend="hybrid")


@pytest.mark.skipif(HAS_CUDA, reason="the CPU refusal only exists without CUDA tensors")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="backend='hybrid' needs CUDA tensors.*TRITON_INTERPRET"):
        clipfast.clip_loss(x, x, 2.0, backend="hybrid")


# --------------------------------------------------------------------------- #
# The memory budget
# --------------------------------------------------------------------------- #


def _all_results(fn, n=70, d=12, seed=3, retain=False):
    x, y = make_features(n, d, torch.float32, DEVICE, seed)
    x.requires_grad_()
    y.requires_grad_()
    s = torch.tensor(9.0, device=DEVICE, requires_grad=True)
    b = torch.tensor(-1.0, device=DEVICE, requires_grad=True)
    loss = fn(x, y, s, b)
    grads = torch.autograd.grad(loss, (x, y, s, b), retain_graph=retain, allow_unused=True)
    out = [loss] + [g for g in grads if g is not None]
    if retain:
        again = torch.autograd.grad(loss, (x, y, s, b), allow_unused=True)
        out += [g for g in again if g is not None]
    return out


@pytest.mark.parametrize("backend,size", [("hybrid", dict(panel_size=16)),
                                          ("chunked", dict(chunk_elements=16 * 70))])
@pytest.mark.parametrize("loss", ["clip", "siglip", "rows"])
def test_any_budget_gives_the_same_bits(backend, size, loss):
    def make(budget):
        def fn(x, y, s, b):
            if loss == "clip":
                return clipfast.clip_loss(x, y, s, logit_bias=b, backend=backend,
                                          memory_budget=budget, **size)
            if loss == "siglip":
                return clipfast.siglip_loss(x, y, s, b, backend=backend, memory_budget=budget,
                                            **size)
            return clipfast.info_nce_loss(x, y, s, logit_bias=b, backend=backend,
                                          memory_budget=budget, **size)
        return fn

    none = _all_results(make(None))
    # Two panels' worth (the rest recomputed), everything, and a retain_graph
    # second backward over the kept panels (they must survive the first).
    for budget in (2 * 16 * 70 * 4, float("inf")):
        for got, want in zip(_all_results(make(budget), retain=True), none + none[1:]):
            assert torch.equal(got, want), f"{backend} {loss} budget={budget}"


def test_kept_rows_are_whole_panels_within_the_budget():
    assert panels.kept_rows(1000, 500, 100, 0.0) == 0
    assert panels.kept_rows(1000, 500, 100, float("inf")) == 1000
    # 250 rows of fp32 fit; whole panels of 100 rows: 200.
    assert panels.kept_rows(1000, 500, 100, 250 * 500 * 4) == 200
    assert panels.kept_rows(1000, 500, 100, 1000 * 500 * 4) == 1000
    assert panels.kept_rows(1000, 500, 100, 99 * 500 * 4) == 0


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (float("nan"), ValueError),
                                       ("1GB", TypeError), (True, TypeError)])
def test_bad_budgets_are_refused_naming_the_argument(bad, error):
    x = torch.randn(6, 4, device=DEVICE)
    with pytest.raises(error, match="memory_budget"):
        clipfast.clip_loss(x, x, 2.0, backend="hybrid", memory_budget=bad)
    with pytest.raises(error, match="memory_budget"):
        clipfast.ClipLoss(memory_budget=bad)


def _gemm_flops(fn) -> int:
    """FLOPs of the matrix products (aten mm / addmm) fn runs, from their shapes."""
    from torch.profiler import ProfilerActivity, profile

    products = {"aten::mm", "aten::addmm", "aten::addmm_"}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    total = 0
    for event in prof.events():
        if event.name not in products:
            continue
        if event.cpu_parent is not None and event.cpu_parent.name in products:
            continue  # an addmm's own mm, counted once
        # mm(a, b[, out]) and addmm(acc, a, b[, out]): the first two products' shapes.
        shapes = [s for s in event.input_shapes if len(s) == 2]
        a, b = shapes[:2] if event.name == "aten::mm" else shapes[1:3]
        total += 2 * a[0] * a[1] * b[1]
    return total


@pytest.mark.skipif(HAS_CUDA, reason="counts CPU aten ops; on CUDA the same products run")
@pytest.mark.parametrize("budget,gemms", [(None, 4), (float("inf"), 3)])
def test_gemm_work_is_four_products_or_three_with_kept_panels(budget, gemms):
    n, d = 96, 16
    x, y = make_features(n, d, torch.bfloat16, DEVICE, seed=1)
    x.requires_grad_()
    y.requires_grad_()

    def step():
        loss = clipfast.clip_loss(x, y, 10.0, backend="hybrid", panel_size=32,
                                  memory_budget=budget)
        loss.backward()

    assert _gemm_flops(step) == gemms * 2 * n * n * d


# --------------------------------------------------------------------------- #
# Numerics that must not be hidden
# --------------------------------------------------------------------------- #


def test_nan_features_give_a_nan_loss_and_nan_gradients():
    x, y = make_features(40, 8, torch.float32, DEVICE, seed=0)
    x[7, 3] = float("nan")
    x.requires_grad_()
    loss = clipfast.clip_loss(x, y, 10.0, backend="hybrid", panel_size=16)
    assert torch.isnan(loss)
    (grad,) = torch.autograd.grad(loss, (x,))
    assert torch.isnan(grad).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [2.0 ** 70, 2.0 ** -70])
def test_rows_far_out_of_range_give_the_fp64_loss(dtype, magnitude):
    # |x| |y| past fp32's range (or below it) in the raw GEMM: such rows are
    # scaled by a power of two first, so the loss is that of their directions
    # (huge rows) or of x / eps (tiny ones, clamped as F.normalize clamps).
    x, y = make_features(50, 16, torch.float32, DEVICE, seed=5)
    x[::3] *= magnitude
    y[1::4] *= magnitude
    x, y = x.to(dtype), y.to(dtype)
    got = clipfast.clip_loss(x, y, 20.0, backend="hybrid", panel_size=16, allow_tf32=False)
    unit = clipfast.clip_loss(x.double(), y.double(), 20.0, backend="reference")
    assert got.item() == pytest.approx(unit.item(), rel=1e-5)
    xg = x.detach().clone().requires_grad_()
    loss = clipfast.clip_loss(xg, y, 20.0, backend="hybrid", panel_size=16, allow_tf32=False)
    (grad,) = torch.autograd.grad(loss, (xg,))
    assert torch.isfinite(grad).all()
    # Scale-free gradients (times |x_i|) against fp64.
    xd = x.double().requires_grad_()
    (truth,) = torch.autograd.grad(clipfast.clip_loss(xd, y.double(), 20.0, backend="reference"),
                                   (xd,))
    norms = x.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    err = ((grad.double() - truth) * norms).abs().max().item()
    tol = 4 * (torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6)
    assert err <= tol * (truth * norms).abs().max().item() + 1e-9


def test_double_backward_gives_the_reference_second_derivative():
    x, y = make_features(20, 6, torch.float32, DEVICE, seed=2)
    x.requires_grad_()
    s = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    loss = clipfast.clip_loss(x, y, s, backend="hybrid")
    (gx,) = torch.autograd.grad(loss, (x,), create_graph=True)
    (gs,) = torch.autograd.grad(gx.square().sum(), (s,))
    ref_x = x.detach().double().requires_grad_()
    ref_s = s.detach().double().requires_grad_()
    ref = clipfast.clip_loss(ref_x, y.double(), ref_s, backend="reference")
    (rgx,) = torch.autograd.grad(ref, (ref_x,), create_graph=True)
    (rgs,) = torch.autograd.grad(rgx.square().sum(), (ref_s,))
    assert gs.item() == pytest.approx(rgs.item(), rel=1e-4)


def test_several_threads_get_their_own_answers():
    inputs = [make_features(33, 8, torch.float16, DEVICE, seed=i) for i in range(4)]
    want = [clipfast.clip_loss(x, y, 7.0, backend="hybrid", panel_size=8) for x, y in inputs]
    got = [None] * len(inputs)

    def work(i):
        x, y = inputs[i]
        got[i] = clipfast.clip_loss(x, y, 7.0, backend="hybrid", panel_size=8)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_compile_fullgraph_with_a_budget_matches_eager():
    torch._dynamo.reset()

    def step(x, y, s):
        return clipfast.clip_loss(x, y, s, backend="hybrid", panel_size=16,
                                  memory_budget=float("inf"))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        x, y = make_features(40, 8, torch.float32, DEVICE, seed=4)
        x.requires_grad_()
        s = torch.tensor(12.0, device=DEVICE, requires_grad=True)
        loss = fn(x, y, s)
        loss.backward()
        results.append((loss.detach(), x.grad, s.grad))
    for eager, compiled_value in zip(*results):
        assert torch.equal(compiled_value, eager)


# --------------------------------------------------------------------------- #
# GPU only
# --------------------------------------------------------------------------- #


@requires_cuda
@pytest.mark.parametrize("n,d", [(4096, 512), (5000, 1025)])
def test_bf16_on_the_gpu_by_the_rule(n, d):
    assert_hybrid_rule(_clip("hybrid"), _clip("chunked"), n, d, torch.bfloat16)


@requires_cuda
def test_half_gemm_with_fp32_results_is_used_on_the_gpu():
    # torch >= 2.8 has torch.mm(..., out_dtype=float32) on CUDA: no fp32
    # copies of the operands (the probe says why not where it fails).
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8):
        assert panels.half_gemm_has_fp32_out(torch.device("cuda"))


@requires_cuda
def test_gpu_memory_is_linear():
    from ...parity import assert_gpu_memory_is_linear

    # Extra memory: an fp32 panel (<= 512 MB), dY's fp32 accumulator (2x the
    # text gradient), the fp16 product copies (1x both gradients): about 4x
    # the two gradients' 512 MB at N = 131072, d = 1024.
    assert_gpu_memory_is_linear("hybrid", limit=4.5)
