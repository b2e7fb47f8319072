"""The CUDA C++ backend (clipfast._cuda). Without a GPU: the module builds
wherever nvcc is, loads, and reports failures as Python exceptions. With a
GPU: parity with the reference (and the Triton backend) in every dtype."""

import shutil

import pytest
import torch

from clipfast import clip_loss
from clipfast.backends.cuda import available, panel_plan, split_low_bytes

from ..parity import (HAS_CUDA, assert_gpu_memory_is_linear, assert_parity, make_features,
                     requires_cuda, unaligned_copy)

HAS_NVCC = shutil.which("nvcc") is not None


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc on this machine: the CUDA extension is not built")
def test_extension_is_built_wherever_nvcc_is():
    # CI has nvcc: if the CUDA sources stop compiling, this fails.
    assert available(), "clipfast._cuda is missing although nvcc is present"


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc on this machine: the CUDA extension is not built")
def test_bad_arguments_raise_value_errors():
    from clipfast import _cuda

    with pytest.raises(ValueError, match="dtype code"):
        _cuda.forward(7, 0, 0, 4, 4, 1.0, 0.0, True, *([0] * 7), 1, 1, 0, 0, 0, 0, False, 0)
    with pytest.raises(ValueError, match="n >= 1"):
        _cuda.forward(0, 0, 0, 0, 4, 1.0, 0.0, True, *([0] * 7), 1, 1, 0, 0, 0, 0, False, 0)


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc on this machine: the CUDA extension is not built")
def test_backward_rejects_bad_arguments():
    from clipfast import _cuda

    ptrs = [0] * 6  # inv_x, inv_y, row_max, row_logsum, col_max, col_logsum
    with pytest.raises(ValueError, match="dtype code"):
        _cuda.backward(9, 0, 0, 4, 4, 1.0, 0.0, True, *ptrs, 1.0, 0,
                       128, 128, 1, 0, 0, 0, 0, True, True, 0, 0, 0)
    with pytest.raises(ValueError, match="panel and ld multiples of 128"):
        _cuda.backward(_cuda.BFLOAT16, 0, 0, 4, 4, 1.0, 0.0, True, *ptrs, 1.0, 0,
                       100, 128, 1, 0, 0, 0, 0, True, True, 0, 0, 0)
    with pytest.raises(ValueError, match="ld >= n"):
        _cuda.backward(_cuda.FLOAT16, 0, 0, 300, 4, 1.0, 0.0, True, *ptrs, 1.0, 0,
                       128, 256, 1, 0, 0, 0, 0, True, True, 0, 0, 0)
    with pytest.raises(ValueError, match="takes 28 arguments"):
        _cuda.backward(_cuda.FLOAT16, 0, 0)
    with pytest.raises(ValueError, match="takes 23 arguments"):
        _cuda.forward(_cuda.FLOAT32, 0, 0)


@pytest.mark.skipif(not HAS_NVCC or HAS_CUDA,
                    reason="needs the extension and no usable GPU (a launch must fail)")
def test_launch_failure_is_a_python_exception():
    from clipfast import _cuda

    with pytest.raises(RuntimeError, match="clipfast._cuda: launching inverse_norms_kernel"):
        _cuda.forward(0, 0, 0, 4, 4, 1.0, 0.0, True, *([0] * 7), 1, 1, 0, 0, 0, 0, False, 0)
    with pytest.raises(RuntimeError, match="clipfast._cuda: launching grad_panel_kernel"):
        _cuda.backward(_cuda.BFLOAT16, 0, 0, 4, 4, 1.0, 0.0, True, *([0] * 6), 1.0, 0,
                       128, 128, 1, 0, 0, 0, 0, True, True, 0, 0, 0)


@pytest.mark.parametrize("n,d", [(1, 1), (7, 65), (128, 512), (4099, 1024), (32768, 512),
                                 (65536, 1024), (131072, 1024), (1_000_003, 768)])
@pytest.mark.parametrize("element_bytes", [2, 4])
@pytest.mark.parametrize("sms", [1, 132])
def test_panel_plan(n, d, element_bytes, sms):
    panel, ld = panel_plan(n, d, element_bytes, sms)
    assert ld % 128 == 0 and n <= ld < n + 128
    assert panel % 128 == 0 and 128 <= panel <= ld
    # G (p^2) and the fp32 dX^ accumulator (p x d) fit in max(3/32 of the two
    # gradients' bytes, 32 MiB), unless one 128-row tile is more.
    budget = max(3 * n * d * element_bytes // 16, 32 << 20)
    cost = element_bytes * panel * panel + 4 * d * panel
    assert panel == 128 or cost <= budget
    if element_bytes == 2 and n >= 131072:
        # The memory target: gradients, the low plane of the split dY^
        # accumulator, G panel, dX^ accumulator and the O(N) statistics within
        # 1.25x the gradients for bf16 (tests the formula; the GPU test
        # measures it). fp16 keeps 8 low bits instead of 4 for accuracy.
        grads = 2 * n * d * element_bytes
        scale_sums = 4 * (-(-n // panel)) ** 2 + 4 * (panel // 128) ** 2
        for dtype, target in ((torch.bfloat16, 1.25), (torch.float16, 1.375)):
            extra = grads + n * split_low_bytes(d, dtype) + cost + 4 * 7 * n + scale_sums
            assert extra <= target * grads, dtype
    if sms == 132 and element_bytes == 2 and (n, d) in ((65536, 1024), (131072, 1024)):
        # Whole rounds of blocks (2 per SM): G tiles and product tiles of a
        # panel each fill at least 90% of the rounds they take.
        tiles, slots = panel // 128, 2 * sms
        for blocks in (tiles * tiles, 2 * tiles * -(-d // 128)):
            assert blocks / (slots * -(-blocks // slots)) >= 0.9


def test_cuda_backend_rejects_cpu_tensors():
    x = torch.randn(4, 3)
    if not available():
        with pytest.raises(ImportError, match="CUDA extension"):
            clip_loss(x, x, 1.0, backend="cuda")
    else:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            clip_loss(x, x, 1.0, backend="cuda")


# ----------------------------- GPU only ------------------------------------ #


# fp16/bf16 always run on tensor cores; fp32 runs TF32 tensor cores by default
# (compared with a TF32 reference, as for triton) and IEEE fp32 FMAs without.
DTYPES_TF32 = [(torch.bfloat16, True), (torch.float16, True), (torch.float32, True),
               (torch.float32, False)]


@requires_cuda
@pytest.mark.parametrize("dtype,tf32", DTYPES_TF32)
@pytest.mark.parametrize("n,d", [(1, 1), (7, 65), (97, 123), (257, 512), (1025, 768), (4099, 1024),
                                 (3001, 1280)])
@pytest.mark.parametrize("normalize", [True, False])
def test_cuda_parity(n, d, dtype, tf32, normalize):
    assert_parity("cuda", n, d, x_dtype=dtype, scale=100.0, bias=-1.0, normalize=normalize,
                  device="cuda", allow_tf32=tf32, ref_tf32=tf32)


@requires_cuda
@pytest.mark.parametrize("dtype,tf32", DTYPES_TF32)
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, True)])
def test_cuda_partial_requires_grad(needs, dtype, tf32):
    assert_parity("cuda", 301, 97, x_dtype=dtype, bias=0.5, needs=needs, device="cuda",
                  allow_tf32=tf32, ref_tf32=tf32)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_tensor_cores_on_unaligned_rows(dtype):
    # Rows that start off a 16-byte boundary take the scalar loads, with the
    # same arithmetic as the vector loads: equal results, gradients included.
    x, y = make_features(515, 256, dtype, "cuda", seed=5)

    xs, ys = unaligned_copy(x), unaligned_copy(y)
    assert xs.data_ptr() % 16 != 0
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss_shifted = clip_loss(xs, ys, 30.0, backend="cuda")
    loss_aligned = clip_loss(xa, ya, 30.0, backend="cuda")
    loss_shifted.backward()
    loss_aligned.backward()
    torch.testing.assert_close(loss_shifted, loss_aligned, rtol=0, atol=0)
    torch.testing.assert_close(xs.grad, xa.grad, rtol=0, atol=0)
    torch.testing.assert_close(ys.grad, ya.grad, rtol=0, atol=0)


@requires_cuda
def test_cuda_mixed_dtypes():
    assert_parity("cuda", 1031, 768, x_dtype=torch.bfloat16, y_dtype=torch.float32, device="cuda",
                  ref_tf32=True)


@requires_cuda
@pytest.mark.parametrize("dtype,tf32", DTYPES_TF32)
def test_cuda_large_batch(dtype, tf32):
    # N = 65536 and an N that is a multiple of no tile size.
    assert_parity("cuda", 65536, 256, x_dtype=dtype, scale=100.0, device="cuda",
                  allow_tf32=tf32, ref_tf32=tf32)
    assert_parity("cuda", 65537 - 64 * 3, 200, x_dtype=dtype, device="cuda",
                  allow_tf32=tf32, ref_tf32=tf32)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_triton(dtype):
    x, y = make_features(5003, 512, dtype, "cuda", seed=4)
    a = clip_loss(x, y, 50.0, backend="cuda", allow_tf32=False)
    b = clip_loss(x, y, 50.0, backend="triton", allow_tf32=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@requires_cuda
def test_cuda_gpu_memory_is_linear():
    # The memory target: within 1.25x the two bf16 gradients.
    assert_gpu_memory_is_linear("cuda", 1.25)
