"""The CUDA backend's SigLIP loss: its kernels on the CPU through the
emulation build (clipfast._cuda_emulated, see tests/backends/test_cuda_emulated.py),
against open_clip's formula (clipfast.backends.reference.reference_siglip_loss) by the
accuracy rule of tests/parity.py; and, on a CUDA GPU, the same kernels at
sizes the emulation cannot reach. Tiny shapes here: every emulated block
spawns 256 threads."""

import pytest
import torch

import clipfast
from clipfast.backends import cuda as cuda_backend

from ..parity import make_features, requires_cuda, unaligned_copy
from ..siglip_parity import assert_siglip_parity, loss_and_grads, scalars

emulated = pytest.mark.skipif(
    not cuda_backend.emulation_available(),
    reason="clipfast._cuda_emulated is not built (CLIPFAST_CUDA_EMULATION=0 at install)")


@pytest.fixture
def emulation(monkeypatch):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")


@pytest.fixture
def small_panels(monkeypatch):
    # Square panels of 128: several of them at N = 300, the last partial.
    monkeypatch.setattr(cuda_backend, "panel_plan",
                        lambda n, d, element_bytes, sms, align=128: (128, -(-n // 128) * 128))


# (dtype, allow_tf32, ref_dtype): fp16/bf16 on the tensor-core path, fp32 on
# it in TF32 (judged against the float16 reference: the same 10-bit mantissa
# per product) and fp32 on IEEE FMAs.
PATHS = [(torch.bfloat16, True, None), (torch.float16, True, None),
         (torch.float32, True, torch.float16), (torch.float32, False, None)]

# (n, d, scale, bias, positives, correlated): scales 1 to 100, no bias and
# open_clip's -10 and +3; an N spanning two tiles with a partial one.
CASES = [(1, 1, 10.0, -10.0, True, True), (7, 65, 100.0, None, False, True),
         (130, 24, 1.0, 3.0, True, False)]


@emulated
@pytest.mark.usefixtures("emulation")
@pytest.mark.parametrize("dtype,tf32,ref_dtype", PATHS)
@pytest.mark.parametrize("n,d,scale,bias,positives,correlated", CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_siglip_emulated_parity(dtype, tf32, ref_dtype, n, d, scale, bias, positives, correlated,
                                normalize):
    if not normalize:
        scale = min(scale, 10.0) / d  # raw rows of norm ~ sqrt(d): logits of the same order
    assert_siglip_parity("cuda", n, d, x_dtype=dtype, scale=scale, bias=bias,
                         normalize=normalize, positives=positives, allow_tf32=tf32,
                         ref_dtype=ref_dtype, correlated=correlated)


@emulated
@pytest.mark.usefixtures("emulation", "small_panels")
@pytest.mark.parametrize("dtype,tf32,ref_dtype", PATHS)
def test_siglip_emulated_several_panels(dtype, tf32, ref_dtype):
    # 3 x 3 panels of G (the last 44 rows wide): dX^ accumulated over the
    # column panels, dY^ over the row panels (the split accumulator for
    # fp16/bf16), the scale and bias sums over all nine; d = 99 takes the
    # scalar loads, an odd d the half-used last byte of the bf16 low plane.
    assert_siglip_parity("cuda", 300, 99, x_dtype=dtype, scale=10.0, bias=-10.0,
                         allow_tf32=tf32, ref_dtype=ref_dtype)


@emulated
@pytest.mark.usefixtures("emulation", "small_panels")
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True)])
def test_siglip_emulated_partial_requires_grad(needs):
    assert_siglip_parity("cuda", 150, 40, x_dtype=torch.bfloat16, needs=needs, scale=20.0,
                         bias=-5.0)


@emulated
@pytest.mark.usefixtures("emulation")
def test_siglip_emulated_mixed_dtypes():
    # A bf16 / fp32 mix runs in fp32 (here IEEE); each gradient in its input's dtype.
    assert_siglip_parity("cuda", 37, 29, x_dtype=torch.bfloat16, y_dtype=torch.float32,
                         allow_tf32=False)


@emulated
@pytest.mark.usefixtures("emulation")
@pytest.mark.parametrize("dtype,tf32,ref_dtype", [PATHS[0], PATHS[3]])
@pytest.mark.parametrize("bias", [-10.0, 10.0])
def test_siglip_emulated_large_logits(dtype, tf32, ref_dtype, bias):
    # Scale 100, |bias| 10: logits in [-110, 110], where a naive
    # log(1 + exp(-t)) overflows and sigmoid is 0 or 1 to the last bit.
    got, _ = assert_siglip_parity("cuda", 45, 64, x_dtype=dtype, scale=100.0, bias=bias,
                                  allow_tf32=tf32, ref_dtype=ref_dtype)
    assert all(torch.isfinite(g).all() for g in got.values())


@emulated
@pytest.mark.usefixtures("emulation")
@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, True), (torch.float32, False)])
def test_siglip_emulated_nan_is_never_hidden(dtype, tf32):
    x, y = make_features(40, 8, dtype, "cpu", seed=2)
    x[7, 3] = float("nan")
    x.requires_grad_()
    s, b = scalars(10.0, -10.0)
    b.requires_grad_()
    loss = clipfast.siglip_loss(x, y, s, b, backend="cuda", allow_tf32=tf32)
    assert torch.isnan(loss)
    gx, gb = torch.autograd.grad(loss, (x, b))
    assert torch.isnan(gx).any() and torch.isnan(gb)


@emulated
@pytest.mark.usefixtures("emulation")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_siglip_emulated_unaligned_rows_match_vector_loads(dtype):
    # Rows off a 16-byte boundary take the scalar loads: the same numbers.
    x, y = make_features(150, 32, dtype, "cpu", seed=5)
    s, b = scalars(10.0, -10.0)
    results = [loss_and_grads(lambda *a: clipfast.siglip_loss(*a, backend="cuda"), xs, ys, s, b,
                              (True, True, True, True))
               for xs, ys in ((unaligned_copy(x), unaligned_copy(y)), (x, y))]
    assert unaligned_copy(x).data_ptr() % 16 != 0
    for key in results[1]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=0)


@emulated
@pytest.mark.usefixtures("emulation")
@pytest.mark.parametrize("dtype,tf32", [(torch.float16, True), (torch.float32, False)])
def test_siglip_emulated_runs_are_bitwise_reproducible(dtype, tf32):
    # The emulated threads interleave differently on every run: a missing
    # barrier or a shared-memory race (the second block_sum of the bias
    # partial, say) shows up as differing bits.
    x, y = make_features(140, 20, dtype, "cpu", seed=6)
    s, b = scalars(7.0, -3.0)
    runs = [loss_and_grads(lambda *a: clipfast.siglip_loss(*a, backend="cuda", allow_tf32=tf32),
                           x, y, s, b, (True, True, True, True)) for _ in range(3)]
    for other in runs[1:]:
        for key in runs[0]:
            torch.testing.assert_close(other[key], runs[0][key], rtol=0, atol=0)


@emulated
@pytest.mark.usefixtures("emulation")
@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, True), (torch.float32, False)])
def test_siglip_emulated_huge_rows(dtype, tf32):
    # Rows times 2^100 take CLIP's overflow-safe norms and the scaled stages
    # of tiles holding a huge row (tiles.cu): exactly the unit rows of the
    # unscaled features, so the loss, the text and scalar gradients are bit
    # for bit the same, and the scaled rows' gradients 2^-100 times theirs.
    x, y = make_features(40, 16, dtype, "cpu", seed=3)
    huge = x.clone()
    huge[::3] *= 2.0 ** 100
    s, b = scalars(10.0, -10.0)

    def run(features):
        return loss_and_grads(lambda *a: clipfast.siglip_loss(*a, normalize=True, backend="cuda",
                                                              allow_tf32=tf32),
                              features, y, s, b, (True, True, True, True))

    got, want = run(huge), run(x)
    assert torch.isfinite(got["loss"])
    for key in ("loss", "grad_text", "grad_scale", "grad_bias"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    scaled = got["grad_image"].clone()
    scaled[::3] *= 2.0 ** 100
    torch.testing.assert_close(scaled, want["grad_image"], rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# On a CUDA GPU (skipped without one).
# --------------------------------------------------------------------------- #


@requires_cuda
@pytest.mark.parametrize("dtype,tf32,ref_dtype,n", [
    (torch.bfloat16, True, None, 4096), (torch.float16, True, None, 5000),
    (torch.float32, False, None, 5000), (torch.bfloat16, True, None, 16384)])
def test_siglip_gpu_parity(dtype, tf32, ref_dtype, n):
    # Larger N than the emulation reaches: many panels (the default plan), an
    # N that is a multiple of no tile size, and bf16 at N = 16384.
    assert_siglip_parity("cuda", n, 256, x_dtype=dtype, scale=10.0, bias=-10.0, device="cuda",
                         allow_tf32=tf32, ref_dtype=ref_dtype)


@requires_cuda
def test_siglip_gpu_memory_is_linear():
    # Peak extra memory of one bf16 forward + backward at N = 131072, d = 1024
    # (N x N logits would take 32 GiB in bf16): within 1.25x the two gradients,
    # as for the CLIP loss (the same panel workspace).
    n, d = 131072, 1024
    x, y = make_features(n, d, torch.bfloat16, "cuda", seed=1)
    x.requires_grad_()
    y.requires_grad_()
    s, b = scalars(10.0, -10.0, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = clipfast.siglip_loss(x, y, s, b, backend="cuda")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = 2 * n * d * 2
    assert torch.isfinite(loss)
    assert extra <= 1.25 * grad_bytes, (
        f"peak extra {extra / 2**30:.2f} GiB vs gradients {grad_bytes / 2**30:.2f} GiB")


@requires_cuda
@pytest.mark.parametrize("bias", [-10.0, 10.0])
def test_siglip_gpu_large_logits_and_nan(bias):
    got, _ = assert_siglip_parity("cuda", 1000, 128, x_dtype=torch.bfloat16, scale=100.0,
                                  bias=bias, device="cuda")
    assert all(torch.isfinite(g).all() for g in got.values())
    x, y = make_features(1000, 128, torch.bfloat16, "cuda", seed=9)
    x[3, 5] = float("nan")
    s, b = scalars(100.0, bias, "cuda")
    assert torch.isnan(clipfast.siglip_loss(x, y, s, b, backend="cuda"))
