"""Triton SigLIP loss (clipfast/backends/triton/siglip.py) against open_clip's formula
(``clipfast.backends.reference.reference_siglip_loss``) in fp64, by the accuracy rule of
tests/parity.py: the error against fp64 is at most twice that of the plain
reference computed in the same dtype, plus a floor of a few ulps. On CPU the
kernels run through Triton's interpreter (fp32 / fp16, small shapes); with a
GPU the same tests run on CUDA and the GPU-only ones below run too."""

from typing import Optional

import pytest
import torch
import triton
import triton.language as tl

import clipfast
from clipfast.backends.triton.tile_math import _log1p_exp_neg_abs
from clipfast.backends.reference import reference_siglip_loss

from ...parity import HAS_CUDA, assert_within_rule, make_features, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"
NAMES = ("loss", "grad_image", "grad_text", "grad_scale", "grad_bias")


def _triton_op(positives: bool):
    from clipfast.backends.triton.siglip import triton_siglip_ops

    return triton_siglip_ops[positives]


def _loss_and_grads(run, x, y, s, b, needs, cast=lambda dt: dt):
    leaves = []
    for t, need in zip((x, y, s, b), needs):
        leaves.append(None if t is None else
                      t.detach().clone().to(cast(t.dtype)).requires_grad_(need))
    loss = run(*leaves)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(loss, wrt) if wrt else ())
    out = {"loss": loss.detach()}
    for name, t in zip(NAMES[1:], leaves):
        if t is not None and t.requires_grad:
            g = next(grads)
            assert g.dtype == t.dtype and g.shape == t.shape, (name, g.dtype, g.shape)
            out[name] = g
    return out


def assert_siglip_parity(n, d, *, dtype=torch.float32, scale=10.0, bias: Optional[float] = -10.0,
                         normalize=True, positives=True, allow_tf32=False, panel: int = 0,
                         needs=(True, True, True, True), seed=0, features=None):
    """The triton SigLIP loss and gradients against fp64, by tests/parity.py's rule.

    ``panel`` > 0 calls the operator with that backward panel side (the
    public ``siglip_loss`` has no panel argument). With TF32 on a GPU the
    fp16 reference stands in for "the same dtype" (tests/parity.py's
    ref_dtype): the same 10-bit mantissa in every product.
    """
    if features is None:
        x32, y32 = make_features(n, d, torch.float32, DEVICE, seed)
        x, y = x32.to(dtype), y32.to(dtype)
    else:
        x, y = features
    s = torch.tensor(scale, device=DEVICE)
    b = None if bias is None else torch.tensor(bias, device=DEVICE)
    before = (x.clone(), y.clone())

    def triton_run(x_, y_, s_, b_):
        if panel:
            return _triton_op(positives)(x_, y_, s_, b_, normalize, allow_tf32, panel)
        return clipfast.siglip_loss(x_, y_, s_, b_, normalize=normalize, backend="triton",
                                    allow_tf32=allow_tf32, positives=positives)

    def reference_run(x_, y_, s_, b_):
        return reference_siglip_loss(x_, y_, s_, b_, normalize=normalize, positives=positives)

    got = _loss_and_grads(triton_run, x, y, s, b, needs)
    assert torch.equal(x, before[0]) and torch.equal(y, before[1]), "inputs modified"
    # Past N = 8192 the fp64 N x N reference needs tens of GB; the chunked
    # backend (tested against it in fp64) gives the same truth in O(N).
    def chunked_run(x_, y_, s_, b_):
        return clipfast.siglip_loss(x_, y_, s_, b_, normalize=normalize, backend="chunked",
                                    positives=positives)

    truth = _loss_and_grads(reference_run if n <= 8192 else chunked_run, x, y, s, b, needs,
                            cast=lambda dt: torch.float64)
    tf32 = allow_tf32 and dtype == torch.float32 and DEVICE == "cuda"
    ref_dtype = torch.float16 if tf32 else dtype
    same = _loss_and_grads(reference_run, x.to(ref_dtype), y.to(ref_dtype), s, b, needs)

    assert got["loss"].dtype == torch.float32
    # finite_reference: a same-dtype reference that overflowed (an fp16 loss
    # sum past 65504) would excuse any error.
    assert_within_rule(got, truth, same, x, y, scale=scale, bias=bias, normalize=normalize,
                       dtypes=(dtype, dtype), ref_dtype=ref_dtype, finite_reference=True,
                       context=("triton", f"N={n}, d={d}, {dtype}, scale={scale}, bias={bias}, "
                                          f"normalize={normalize}, positives={positives}, "
                                          f"panel={panel}"))
    return got, truth


# Interpreted kernels are slow: every listed N, d, scale, bias and option is
# covered, not their full product.
FP32_CASES = [
    # n, d, scale, bias, normalize, positives
    (1, 1, 1.0, None, True, True),
    (7, 3, 10.0, -10.0, True, True),
    (7, 65, 100.0, 3.0, False, False),
    (97, 1, 100.0, -10.0, True, True),
    (97, 65, 1.0, None, False, True),
    (97, 3, 14.3, 3.0, True, False),
    (130, 33, 100.0, -10.0, True, True),
    (131, 65, 10.0, None, True, False),
    (33, 130, 50.0, 3.0, False, True),
]


@pytest.mark.parametrize("n,d,scale,bias,normalize,positives", FP32_CASES)
def test_siglip_triton_fp32(n, d, scale, bias, normalize, positives):
    assert_siglip_parity(n, d, scale=scale, bias=bias, normalize=normalize, positives=positives)


@pytest.mark.parametrize("n,d,normalize", [(97, 65, True), (130, 7, False)])
def test_siglip_triton_tf32_allowed(n, d, normalize):
    # TF32 on a GPU (judged against the fp16 reference); the interpreter
    # computes these in full fp32.
    assert_siglip_parity(n, d, scale=10.0, bias=-10.0, normalize=normalize, allow_tf32=True)


# The fp16 reference sums the N^2 terms into an fp16 result: shapes and
# scales where that sum stays below 65504 (asserted), so it is a yardstick.
@pytest.mark.parametrize("n,d,scale,bias,normalize,positives", [
    (7, 3, 10.0, -10.0, True, True),
    (97, 65, 100.0, -10.0, True, False),
    (130, 7, 1.0, -3.0, False, True),
])
def test_siglip_triton_fp16(n, d, scale, bias, normalize, positives):
    assert_siglip_parity(n, d, dtype=torch.float16, scale=scale, bias=bias, normalize=normalize,
                         positives=positives)


@pytest.mark.parametrize("panel,dtype", [(16, torch.float32), (40, torch.float32),
                                         (64, torch.float16)])
@pytest.mark.parametrize("positives", [True, False])
def test_siglip_triton_several_panels(panel, dtype, positives):
    # Panel sides that do not divide N, and requests below the tile (rounded
    # up to one): dX^ finished per row panel, dY^ summed over row panels (the
    # 24-bit split accumulator for fp16), the scale and bias partials summed
    # over column panels.
    assert_siglip_parity(101, 47, dtype=dtype, scale=30.0, bias=-10.0, positives=positives,
                         panel=panel)


@pytest.mark.parametrize("bias", [-10.0, 10.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_siglip_triton_large_logits(bias, normalize):
    # Unnormalised features at scale 100 give |L| in the thousands: softplus
    # is the hinge exactly and sigmoid saturates to 0 or 1, in both.
    got, _ = assert_siglip_parity(70, 33, scale=100.0, bias=bias, normalize=normalize, panel=32)
    for key in got:
        assert torch.isfinite(got[key]).all(), key


@pytest.mark.parametrize("needs", [
    (True, False, False, False), (False, True, False, False), (False, False, True, False),
    (False, False, False, True), (True, True, False, True)])
def test_siglip_triton_partial_requires_grad(needs):
    assert_siglip_parity(37, 29, scale=20.0, bias=-5.0, needs=needs)


def test_siglip_triton_without_bias_returns_no_bias_grad():
    got, _ = assert_siglip_parity(20, 9, bias=None)
    assert "grad_bias" not in got


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_siglip_triton_nan_reaches_loss_and_gradients(dtype):
    x, y = make_features(40, 24, dtype, DEVICE, seed=5)
    x[7, 3] = float("nan")
    x.requires_grad_()
    y.requires_grad_()
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    b = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    loss = _triton_op(True)(x, y, s, b, True, False, 16)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad).any() and torch.isnan(y.grad).any()
    assert torch.isnan(s.grad) and torch.isnan(b.grad)


def test_siglip_triton_zero_and_tiny_rows():
    # Rows below eps sit on the normalisation clamp (Jacobian I / eps); the
    # folded panel carries inv norms up to 1e12.
    x, y = make_features(20, 9, torch.float32, DEVICE, seed=7)
    x[3] = 0
    y[5] = 1e-14
    assert_siglip_parity(20, 9, scale=5.0, bias=-3.0, features=(x, y))


def test_siglip_triton_huge_rows_keep_their_directions():
    # Rows past 2^32 in norm (products of two past fp32's range) take the
    # scaled-operand tiles; 2^66 squared overflows fp32 itself. With
    # normalize=True the loss is that of the directions: judged against fp64
    # on the same inputs (the fp32 plain reference overflows here, so the
    # accuracy rule has no yardstick). Gradients row-scaled by |x| are O(s/N).
    x, y = make_features(40, 17, torch.float32, DEVICE, seed=9)
    x[3] *= 2.0 ** 66
    y[5] *= 2.0 ** 66
    y[8] *= 2.0 ** 40
    s, b = torch.tensor(20.0, device=DEVICE), torch.tensor(-5.0, device=DEVICE)

    def run(x_, y_, s_, b_):
        return _triton_op(True)(x_, y_, s_, b_, True, False, 16)

    def truth_run(x_, y_, s_, b_):
        return reference_siglip_loss(x_, y_, s_, b_, normalize=True)

    needs = (True, True, True, True)
    got = _loss_and_grads(run, x, y, s, b, needs)
    truth = _loss_and_grads(truth_run, x, y, s, b, needs, cast=lambda dt: torch.float64)
    eps = torch.finfo(torch.float32).eps
    for key in ("loss", "grad_scale", "grad_bias"):
        assert abs(got[key].item() - truth[key].item()) <= 64 * eps * max(abs(truth[key].item()), 1)
    for key, feats in (("grad_image", x), ("grad_text", y)):
        norms = feats.double().norm(dim=1, keepdim=True)
        err = ((got[key].double() - truth[key]) * norms).abs().max().item()
        assert err <= 64 * eps * 20.0 / 40, (key, err)


def test_siglip_triton_non_contiguous_and_deterministic():
    big_x, big_y = make_features(70, 90, torch.float32, DEVICE, seed=3)
    big_x.requires_grad_()
    big_y.requires_grad_()
    runs = []
    for _ in range(2):
        x = big_x[::2, 5:70]  # row and column strides both non-trivial
        y = big_y.t().contiguous().t()[1::2, 3:68]
        assert not x.is_contiguous() and not y.is_contiguous()
        loss = clipfast.siglip_loss(x, y, 20.0, -5.0, normalize=True, backend="triton",
                                    allow_tf32=False)
        runs.append((loss.detach(), *torch.autograd.grad(loss, (big_x, big_y))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # no atomics: bitwise repeatable
    x, y = big_x.detach()[::2, 5:70], big_y.detach()[1::2, 3:68]
    want = clipfast.siglip_loss(x, y, 20.0, -5.0, normalize=True, backend="chunked")
    torch.testing.assert_close(runs[0][0], want, rtol=1e-5, atol=1e-6)


def test_siglip_triton_gradients_do_not_alias_inputs():
    x, y = make_features(16, 8, torch.float32, DEVICE, seed=2)
    x.requires_grad_()
    y.requires_grad_()
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    b = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    loss = clipfast.siglip_loss(x, y, s, b, backend="triton")
    grads = torch.autograd.grad(loss, (x, y, s, b))
    for g, t in zip(grads, (x, y, s, b)):
        assert g.data_ptr() != t.data_ptr()
        assert g.shape == t.shape and g.dtype == t.dtype


def test_siglip_triton_refuses_bf16_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, y = make_features(24, 16, torch.bfloat16, DEVICE, seed=2)
    with pytest.raises(TypeError, match=r"(?s)bfloat16.*interpreter"):
        clipfast.siglip_loss(x, y, 10.0, -10.0, backend="triton")


@triton.jit
def _log1p_exp_kernel(l_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    value, _ = _log1p_exp_neg_abs(tl.load(l_ptr + offs, mask=offs < n, other=0.0))
    tl.store(out_ptr + offs, value, mask=offs < n)


def test_siglip_triton_log1p_exp_is_accurate():
    # The kernels' softplus without a log1p: log(1 + e) corrected for the
    # rounding of 1 + e, over |L| from 0 to past fp32's exp underflow.
    logits = torch.cat([torch.linspace(-110, 110, 4001), torch.logspace(-9, 1, 2001)])
    logits = logits.to(device=DEVICE)
    out = torch.empty_like(logits)
    _log1p_exp_kernel[(triton.cdiv(logits.numel(), 1024),)](logits, out, logits.numel(),
                                                            BLOCK=1024)
    truth = torch.log1p(torch.exp(-logits.double().abs()))
    # A few ulps relative plus |L| ulps: exp2(|L| * -log2(e)) rounds its
    # argument first (as an fp32 L already carries about |L| ulps of the
    # matmul's rounding); nothing below fp32's normal range (GPUs flush it).
    eps, tiny = torch.finfo(torch.float32).eps, torch.finfo(torch.float32).tiny
    ulps = 3 + logits.double().abs()
    excess = (out.double() - truth).abs() - ulps * eps * truth
    assert excess.max().item() <= tiny, excess.max().item()
    assert (out[truth > 1e-30] > 0).all()


# ----------------------------- GPU only ------------------------------------ #


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(1, 1), (97, 123), (1025, 768), (4099, 1024), (3001, 1152)])
@pytest.mark.parametrize("normalize", [True, False])
def test_siglip_triton_gpu_parity(n, d, dtype, normalize):
    assert_siglip_parity(n, d, dtype=dtype, scale=10.0, bias=-10.0, normalize=normalize,
                         allow_tf32=True)


@requires_cuda
@pytest.mark.parametrize("positives", [True, False])
def test_siglip_triton_gpu_bf16_large_logits(positives):
    assert_siglip_parity(2049, 512, dtype=torch.bfloat16, scale=100.0, bias=10.0,
                         normalize=False, positives=positives)


@requires_cuda
@pytest.mark.parametrize("n,dtype", [(32768, torch.bfloat16), (16384, torch.float32)])
def test_siglip_triton_gpu_large_batch(n, dtype):
    # Large N is where an int32 offset or a partial-sum bug would show; the
    # plain references (N x N) still fit in 80 GB here.
    assert_siglip_parity(n, 256, dtype=dtype, scale=10.0, bias=-10.0, allow_tf32=True)


@requires_cuda
def test_siglip_triton_gpu_memory_is_linear():
    # Peak extra memory of a bf16 forward + backward at N = 65536, d = 768
    # (the published fused kernel's benchmark point), the gradients included.
    # By allocation: the two gradients (1.0), dY^'s accumulator byte plane
    # (0.25), one G panel of side p in bf16 and the fp32 dX^ buffer of the
    # current row panel (p x d): about 0.12 at the default p (~2800), so
    # about 1.37x the gradients in all. Both the sum of those allocations and
    # the ratio are checked.
    from clipfast.backends.triton.launchers import siglip_panel_plan

    n, d = 65536, 768
    x, y = make_features(n, d, torch.bfloat16, "cuda", seed=1)
    x.requires_grad_()
    y.requires_grad_()
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    b = torch.tensor(-10.0, device="cuda", requires_grad=True)
    side = siglip_panel_plan(x, y, False, True, None).side
    grad_bytes = 2 * n * d * 2
    planned = grad_bytes + n * d + side * side * 2 + side * d * 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = clipfast.siglip_loss(x, y, s, b, normalize=False, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # O(N) statistics and partials (well under a MiB) and allocator rounding.
    assert extra <= planned + 4 * 2**20, (
        f"peak extra {extra / 2**20:.1f} MiB vs planned {planned / 2**20:.1f} MiB")
    assert extra <= 1.4 * grad_bytes, (
        f"peak extra {extra / 2**20:.0f} MiB vs gradients {grad_bytes / 2**20:.0f} MiB")
