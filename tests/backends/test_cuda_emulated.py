"""The CUDA backend's kernels on the CPU, through the emulation build
(clipfast._cuda_emulated: csrc/cuda compiled against csrc/emulate, every
block's threads on std::threads). The real kernel code, indexing and
synchronisation run in CI this way; tensor-core fragments are emulated whole,
so these tests check the algorithm and its arithmetic, not the hardware's
summation order or speed (tests/backends/test_cuda.py does that on a GPU).
Tiny shapes: every emulated block spawns 256 threads."""

import pytest
import torch

from clipfast import clip_loss
from clipfast.backends import cuda as cuda_backend

from ..parity import assert_parity, make_features, unaligned_copy

pytestmark = pytest.mark.skipif(
    not cuda_backend.emulation_available(),
    reason="clipfast._cuda_emulated is not built (CLIPFAST_CUDA_EMULATION=0 at install)",
)


@pytest.fixture(autouse=True)
def emulation(monkeypatch):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")


# (dtype, allow_tf32, ref_dtype): fp16/bf16 on the tensor-core path, fp32 on
# it in TF32 (judged against the float16 reference: the same 10-bit mantissa
# per product) and fp32 on IEEE FMAs.
PATHS = [(torch.bfloat16, True, None), (torch.float16, True, None),
         (torch.float32, True, torch.float16), (torch.float32, False, None)]


@pytest.mark.parametrize("dtype,tf32,ref_dtype", PATHS)
@pytest.mark.parametrize("n,d", [(1, 1), (7, 65), (130, 24)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("scale,correlated", [(50.0, True), (4.0, False)])
def test_emulated_parity(n, d, dtype, tf32, ref_dtype, normalize, scale, correlated):
    # Confident pairs at a large scale (trained CLIP), and hard ones at a small
    # scale where every row's gradient is of similar size, so that an error
    # confined to a few rows stands out.
    assert_parity("cuda", n, d, x_dtype=dtype, scale=scale, bias=-1.0, normalize=normalize,
                  allow_tf32=tf32, ref_dtype=ref_dtype, correlated=correlated)


@pytest.mark.parametrize("dtype,tf32,ref_dtype", PATHS)
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, True)])
def test_emulated_partial_requires_grad(needs, dtype, tf32, ref_dtype):
    assert_parity("cuda", 70, 19, x_dtype=dtype, bias=0.5, needs=needs, allow_tf32=tf32,
                  ref_dtype=ref_dtype)


def test_emulated_mixed_dtypes():
    # A bf16 / fp32 mix runs in fp32 (here IEEE).
    assert_parity("cuda", 37, 29, x_dtype=torch.bfloat16, y_dtype=torch.float32, allow_tf32=False)


@pytest.mark.parametrize("dtype,tf32,ref_dtype", PATHS)
@pytest.mark.parametrize("d", [104, 99])
def test_emulated_several_panels(monkeypatch, dtype, tf32, ref_dtype, d):
    # 3 x 3 panels of G of 128 (the last partial: 300 = 2 * 128 + 44): dX^
    # accumulates over the column panels in fp32, dY^ over the row panels in
    # the gradient itself (the 20-bit split for fp16/bf16). d = 104 takes the
    # cp.async stages (K = d in 4 or 7 stages of the 3-stage pipeline, the last
    # one partial); d = 99 the scalar loads, and an odd d leaves the last 4-bit
    # plane entry of each row half used.
    monkeypatch.setattr(cuda_backend, "panel_plan",
                        lambda n, d, element_bytes, sms, align=128: (128, -(-n // 128) * 128))
    assert_parity("cuda", 300, d, x_dtype=dtype, scale=30.0, bias=0.5, allow_tf32=tf32,
                  ref_dtype=ref_dtype)


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, True, False)])
def test_emulated_several_panels_partial_requires_grad(monkeypatch, needs):
    monkeypatch.setattr(cuda_backend, "panel_plan",
                        lambda n, d, element_bytes, sms, align=128: (128, -(-n // 128) * 128))
    assert_parity("cuda", 260, 40, x_dtype=torch.bfloat16, needs=needs, scale=20.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_unaligned_rows_match_vector_loads(dtype):
    # Rows off a 16-byte boundary take the scalar loads: same numbers.
    x, y = make_features(150, 32, dtype, "cpu", seed=5)

    xs, ys = unaligned_copy(x), unaligned_copy(y)
    assert xs.data_ptr() % 16 != 0
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    results = []
    for a, b in ((xs, ys), (xa, ya)):
        loss = clip_loss(a, b, 30.0, backend="cuda")
        loss.backward()
        results.append((loss, a.grad, b.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, True), (torch.float32, False)])
def test_emulated_nan_is_never_hidden(dtype, tf32):
    x, y = make_features(40, 8, dtype, "cpu", seed=2)
    x[7, 3] = float("nan")
    x.requires_grad_()
    loss = clip_loss(x, y, 10.0, backend="cuda", allow_tf32=tf32)
    assert torch.isnan(loss)
    (grad,) = torch.autograd.grad(loss, (x,))
    assert torch.isnan(grad).any()


def test_cpu_tensors_need_the_emulation_switch(monkeypatch):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "0")
    x = torch.randn(4, 3)
    if cuda_backend.available():
        with pytest.raises(ValueError, match="CLIPFAST_CUDA_EMULATION=1"):
            clip_loss(x, x, 1.0, backend="cuda")
    else:
        with pytest.raises(ImportError, match="CUDA extension"):
            clip_loss(x, x, 1.0, backend="cuda")


@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, True), (torch.float32, False)])
def test_emulated_runs_are_bitwise_reproducible(dtype, tf32):
    # The emulated threads interleave differently on every run: a missing
    # barrier or a shared-memory race shows up as differing bits. (The kernels
    # use no atomics and merge every partial in a fixed order.)
    x, y = make_features(140, 20, dtype, "cpu", seed=6)
    runs = []
    for _ in range(3):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        scale = torch.tensor(7.0, requires_grad=True)
        loss = clip_loss(xr, yr, scale, backend="cuda", allow_tf32=tf32)
        runs.append((loss, *torch.autograd.grad(loss, (xr, yr, scale))))
    for other in runs[1:]:
        for got, want in zip(other, runs[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
