"""Triton backend. On CPU the kernels run through Triton's interpreter (fp32 /
fp16, small shapes); with a GPU the same kernels run on CUDA in every dtype."""

import pytest
import torch

from clipfast import clip_loss

from ...parity import HAS_CUDA, assert_gpu_memory_is_linear, assert_parity, make_features, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"

# Interpreted kernels are slow: cover every listed N, d, scale and option, but
# not their full product.
INTERPRETER_CASES = [
    # n, d, scale, bias, normalize
    (1, 1, 1.0, None, True),
    (2, 3, 100.0, -1.0, False),
    (7, 65, 14.3, None, True),
    (7, 1, 100.0, 3.0, True),
    (97, 123, 100.0, None, True),
    (97, 3, 1.0, 0.5, False),
    (97, 512, 14.3, -2.0, True),
    (257, 65, 14.3, 2.0, True),
    (257, 123, 100.0, None, False),
    (123, 1025, 100.0, None, True),
]


@pytest.mark.parametrize("n,d,scale,bias,normalize", INTERPRETER_CASES)
def test_triton_parity_fp32(n, d, scale, bias, normalize):
    assert_parity("triton", n, d, scale=scale, bias=bias, normalize=normalize, device=DEVICE,
                  allow_tf32=False)


@pytest.mark.parametrize("n,d", [(33, 65), (97, 123)])
def test_triton_parity_fp16(n, d):
    assert_parity("triton", n, d, x_dtype=torch.float16, scale=100.0, bias=1.0, device=DEVICE)


@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_triton_parity_mixed_dtypes(x_dtype, y_dtype):
    # A bf16 side mixed with another dtype is computed in fp32: correct under
    # the interpreter too, unlike two bf16 operands (next test).
    assert_parity("triton", 41, 37, x_dtype=x_dtype, y_dtype=y_dtype, device=DEVICE, allow_tf32=False)


@pytest.mark.parametrize("local_loss", [False, True])
def test_triton_refuses_bf16_under_the_interpreter(monkeypatch, local_loss):
    # The interpreter's bf16 dot gave losses around 1e9, silently. The check
    # runs before any launch, so it holds on a GPU machine too when the
    # interpreter is switched on.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, y = make_features(24, 16, torch.bfloat16, DEVICE, seed=2)
    before = (x.clone(), y.clone())
    with pytest.raises(TypeError, match=r"(?s)bfloat16.*interpreter.*backend='chunked'.*float16"):
        if local_loss:
            from clipfast.backends.triton.clip_loss import TritonRowCrossEntropyFunction
            TritonRowCrossEntropyFunction.apply(x, y, torch.tensor(10.0, device=DEVICE), None, True,
                                                0, True, None)
        else:
            clip_loss(x, y, 10.0, backend="triton")
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])


@pytest.mark.parametrize("needs", [
    (True, False, False, False), (False, True, False, False), (False, False, True, False),
    (False, False, False, True), (True, True, False, True)])
def test_triton_partial_requires_grad(needs):
    assert_parity("triton", 37, 29, bias=0.5, needs=needs, device=DEVICE, allow_tf32=False)


@pytest.mark.parametrize("panel", [16, 40, 64])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_panel_sizes(panel, normalize):
    # Panels that do not divide N; requested sizes that are not a multiple of
    # the tile (rounded up to one). Unnormalised features at scale 100 give
    # |L| ~ 1000 and one-hot softmaxes, where a recomputed logit one ulp off
    # the forward's would show up as a spurious gradient.
    assert_parity("triton", 101, 47, scale=100.0 if not normalize else 30.0, normalize=normalize,
                  device=DEVICE, panel_size=panel, allow_tf32=False)


def test_triton_matches_chunked_non_contiguous():
    big_x, big_y = make_features(70, 90, torch.float32, DEVICE, seed=3)
    x = big_x[::2, 5:70]  # row and column strides both non-trivial
    y = big_y.t().contiguous().t()[1::2, 3:68]
    assert not x.is_contiguous() and not y.is_contiguous()
    a = clip_loss(x, y, 20.0, backend="triton", allow_tf32=False)
    b = clip_loss(x, y, 20.0, backend="chunked")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------- GPU only ------------------------------------ #

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n,d", [(1, 1), (97, 123), (257, 512), (1025, 768), (4099, 1024),
                                 (8193, 1152), (3001, 1280)])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_gpu_parity(n, d, dtype, normalize):
    assert_parity("triton", n, d, x_dtype=dtype, scale=100.0, bias=-1.0, normalize=normalize,
                  device="cuda", ref_tf32=True)


@requires_cuda
def test_triton_gpu_fp32_without_tf32():
    assert_parity("triton", 2049, 512, x_dtype=torch.float32, device="cuda", allow_tf32=False)


@requires_cuda
@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_triton_gpu_mixed_dtypes(x_dtype, y_dtype):
    assert_parity("triton", 1031, 768, x_dtype=x_dtype, y_dtype=y_dtype, device="cuda", ref_tf32=True)


@requires_cuda
@pytest.mark.parametrize("n,dtype", [(65536, torch.bfloat16), (65536, torch.float16),
                                     (32768, torch.float32)])
def test_triton_gpu_large_batch(n, dtype):
    # Large N is where a block-size or int32-offset bug would show; the plain
    # same-dtype reference (the error yardstick) still fits in 80 GB here.
    assert_parity("triton", n, 256, x_dtype=dtype, scale=100.0, device="cuda", ref_tf32=True)


@requires_cuda
def test_triton_gpu_memory_is_linear():
    # The fused loss must stay within a small multiple of the gradients' bytes.
    assert_gpu_memory_is_linear("triton", 1.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_nan_reaches_every_gradient(dtype):
    # fp16 text features take the split 16+8-bit accumulator path.
    x, y = make_features(40, 24, dtype, DEVICE, seed=5)
    x[7, 3] = float("nan")
    x.requires_grad_()
    y.requires_grad_()
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    loss = clip_loss(x, y, s, backend="triton", panel_size=16)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad).any() and torch.isnan(y.grad).any() and torch.isnan(s.grad)


@pytest.mark.parametrize("panel", [16, 48])
def test_triton_split_accumulator_over_many_panels(panel):
    # fp16 text gradients accumulate over ceil(N / panel) row panels in the
    # 24-bit split accumulator; the error must stay at the reference's level.
    assert_parity("triton", 150, 40, x_dtype=torch.float16, scale=50.0, device=DEVICE,
                  panel_size=panel)


def test_triton_zero_and_tiny_rows_match_reference():
    # Rows below eps sit on the normalisation clamp (Jacobian I / eps).
    x, y = make_features(20, 9, torch.float32, DEVICE, seed=7)
    x[3] = 0
    y[5] = 1e-14
    x.requires_grad_()
    y.requires_grad_()
    got = torch.autograd.grad(clip_loss(x, y, 5.0, backend="triton", allow_tf32=False), (x, y))
    want = torch.autograd.grad(clip_loss(x, y, 5.0, backend="reference"), (x, y))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("m,k,d,offset", [(1, 1, 3, 0), (5, 15, 7, 10), (33, 97, 65, 31), (40, 80, 9, 40)])
def test_triton_row_cross_entropy_parity(m, k, d, offset, normalize):
    # Rectangular blocks with a label offset: open_clip's local_loss rows.
    from clipfast.backends.triton.clip_loss import TritonRowCrossEntropyFunction

    from ...parity import assert_row_ce_parity

    assert_row_ce_parity(TritonRowCrossEntropyFunction, m, k, d, offset, normalize=normalize,
                         device=DEVICE, extra_args=(False, 16))


@pytest.mark.parametrize("dtype", [torch.float16])
def test_triton_row_cross_entropy_half(dtype):
    from clipfast.backends.triton.clip_loss import TritonRowCrossEntropyFunction

    from ...parity import assert_row_ce_parity

    assert_row_ce_parity(TritonRowCrossEntropyFunction, 33, 66, 40, 33, dtype=dtype, device=DEVICE,
                         extra_args=(True, 16))
