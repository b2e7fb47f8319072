"""The CUDA C++ backend (clipfast._cuda). Without a GPU: the module builds
wherever nvcc is, loads, and reports failures as Python exceptions. With a
GPU: parity with the reference (and the Triton backend) in every dtype."""

import shutil

import pytest
import torch

from clipfast import clip_loss
from clipfast.cuda_backend import available

from .parity import HAS_CUDA, assert_parity, make_features, requires_cuda

HAS_NVCC = shutil.which("nvcc") is not None


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc on this machine: the CUDA extension is not built")
def test_extension_is_built_wherever_nvcc_is():
    # CI has nvcc: if the CUDA sources stop compiling, this fails.
    assert available(), "clipfast._cuda is missing although nvcc is present"


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc on this machine: the CUDA extension is not built")
def test_bad_arguments_raise_value_errors():
    from clipfast import _cuda

    with pytest.raises(ValueError, match="dtype code"):
        _cuda.forward(7, 0, 0, 4, 4, 1.0, 0.0, True, *([0] * 7), 1, 1, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="n >= 1"):
        _cuda.forward(0, 0, 0, 0, 4, 1.0, 0.0, True, *([0] * 7), 1, 1, 0, 0, 0, 0, 0)


@pytest.mark.skipif(not HAS_NVCC or HAS_CUDA,
                    reason="needs the extension and no usable GPU (a launch must fail)")
def test_launch_failure_is_a_python_exception():
    from clipfast import _cuda

    with pytest.raises(RuntimeError, match="clipfast._cuda: launching inverse_norms_kernel"):
        _cuda.forward(0, 0, 0, 4, 4, 1.0, 0.0, True, *([0] * 7), 1, 1, 0, 0, 0, 0, 0)


def test_cuda_backend_rejects_cpu_tensors():
    x = torch.randn(4, 3)
    if not available():
        with pytest.raises(ImportError, match="CUDA extension"):
            clip_loss(x, x, 1.0, backend="cuda")
    else:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            clip_loss(x, x, 1.0, backend="cuda")


# ----------------------------- GPU only ------------------------------------ #


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(1, 1), (7, 65), (97, 123), (257, 512), (1025, 768), (4099, 1024),
                                 (3001, 1280)])
@pytest.mark.parametrize("normalize", [True, False])
def test_cuda_parity(n, d, dtype, normalize):
    assert_parity("cuda", n, d, x_dtype=dtype, scale=100.0, bias=-1.0, normalize=normalize,
                  device="cuda")


@requires_cuda
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, True)])
def test_cuda_partial_requires_grad(needs):
    assert_parity("cuda", 301, 97, bias=0.5, needs=needs, device="cuda")


@requires_cuda
def test_cuda_mixed_dtypes():
    assert_parity("cuda", 1031, 768, x_dtype=torch.bfloat16, y_dtype=torch.float32, device="cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_large_batch(dtype):
    # N = 65536 and an N that is a multiple of no tile size.
    assert_parity("cuda", 65536, 256, x_dtype=dtype, scale=100.0, device="cuda")
    assert_parity("cuda", 65537 - 64 * 3, 200, x_dtype=dtype, device="cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_triton(dtype):
    x, y = make_features(5003, 512, dtype, "cuda", seed=4)
    a = clip_loss(x, y, 50.0, backend="cuda")
    b = clip_loss(x, y, 50.0, backend="triton", allow_tf32=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
