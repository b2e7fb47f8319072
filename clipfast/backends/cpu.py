"""The C++ CPU backend (``backend="cpu"``): thin Python side of ``clipfast._cpu``.

The extension takes raw pointers, so this module makes the inputs contiguous
in one float dtype (float32, or float64 when either input is float64),
allocates every output, and keeps the tensors alive across each call.
"""

from __future__ import annotations

import torch

from ._base import Backend, extension_available, extension_problem, load_extension
from ._ops import (SIGLIP_STATS_ROWS, KernelOptions, compute_dtype, define_clip_loss_op,
                   define_siglip_ops)

_BUILD_HINT = (
    "the C++ extension clipfast._cpu is not built; install the package with "
    "`pip install -e .` (it needs a C++17 compiler with OpenMP) or run "
    "`python setup.py build_ext --inplace`"
)


def extension():
    """The compiled module, or an ImportError that says how to build it."""
    return load_extension("_cpu", "cpu", _BUILD_HINT)


def available() -> bool:
    return extension_available(extension)


def _code(dtype: torch.dtype, ext) -> int:
    return ext.FLOAT64 if dtype == torch.float64 else ext.FLOAT32


def cpu_forward(x, y, scale, bias, options: KernelOptions):
    """(loss, stats) through the C++ kernels (see ``clipfast.backends._ops``)."""
    ext = extension()
    dtype = compute_dtype(x, y)
    xc, yc = x.detach().to(dtype).contiguous(), y.detach().to(dtype).contiguous()
    n, d = xc.shape
    stats = torch.empty(7, n, dtype=dtype)  # inv_x, inv_y, row/col max and log-sum, diag
    loss = ext.forward(_code(dtype, ext), xc.data_ptr(), yc.data_ptr(), n, d, _value(scale),
                       _value(bias), options.normalize, *(row.data_ptr() for row in stats))
    return torch.tensor(loss, dtype=dtype), stats[:6].clone()


def cpu_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                 need_x: bool, need_y: bool, need_scale: bool):
    ext = extension()
    dtype = stats.dtype
    xc, yc = x.detach().to(dtype).contiguous(), y.detach().to(dtype).contiguous()
    stats = stats.contiguous()
    n, d = xc.shape
    grad_x = torch.empty_like(xc) if need_x else None
    grad_y = torch.empty_like(yc) if need_y else None
    ds = ext.backward(_code(dtype, ext), xc.data_ptr(), yc.data_ptr(), n, d, _value(scale),
                      _value(bias), options.normalize, *(row.data_ptr() for row in stats),
                      float(grad_loss), grad_x.data_ptr() if need_x else 0,
                      grad_y.data_ptr() if need_y else 0, need_x, need_y, need_scale)
    grad_scale = torch.tensor(ds, dtype=scale.dtype).reshape(scale.shape) if need_scale else None
    return (None if grad_x is None else grad_x.to(x.dtype),
            None if grad_y is None else grad_y.to(y.dtype), grad_scale)


def _value(t) -> float:
    return 0.0 if t is None else float(t.detach().reshape(()))


cpu_clip_loss_op = define_clip_loss_op("cpu", cpu_forward, cpu_backward)


def cpu_siglip_forward(x, y, scale, bias, options: KernelOptions, positives: bool = True):
    """SigLIP's (loss, stats = [inv_x, inv_y]) through the C++ kernels
    (see ``clipfast.backends._ops``)."""
    ext = extension()
    dtype = compute_dtype(x, y)
    xc, yc = x.detach().to(dtype).contiguous(), y.detach().to(dtype).contiguous()
    n, d = xc.shape
    stats = torch.empty(SIGLIP_STATS_ROWS, n, dtype=dtype)
    loss = ext.siglip_forward(_code(dtype, ext), xc.data_ptr(), yc.data_ptr(), n, d,
                              _value(scale), _value(bias), options.normalize, bool(positives),
                              stats[0].data_ptr(), stats[1].data_ptr())
    return torch.tensor(loss, dtype=dtype), stats


def cpu_siglip_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                        need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
                        positives: bool = True):
    ext = extension()
    dtype = stats.dtype
    xc, yc = x.detach().to(dtype).contiguous(), y.detach().to(dtype).contiguous()
    # The kernel reads the inverse norms (rows 0 and 1) through raw pointers.
    stats = stats.contiguous()
    n, d = xc.shape
    need_bias = need_bias and bias is not None
    grad_x = torch.empty_like(xc) if need_x else None
    grad_y = torch.empty_like(yc) if need_y else None
    ds, db = ext.siglip_backward(
        _code(dtype, ext), xc.data_ptr(), yc.data_ptr(), n, d, _value(scale), _value(bias),
        options.normalize, bool(positives), stats[0].data_ptr(), stats[1].data_ptr(),
        float(grad_loss), grad_x.data_ptr() if need_x else 0, grad_y.data_ptr() if need_y else 0,
        need_x, need_y, need_scale or need_bias)
    grad_scale = torch.tensor(ds, dtype=scale.dtype).reshape(scale.shape) if need_scale else None
    grad_bias = torch.tensor(db, dtype=bias.dtype).reshape(bias.shape) if need_bias else None
    return (None if grad_x is None else grad_x.to(x.dtype),
            None if grad_y is None else grad_y.to(y.dtype), grad_scale, grad_bias)


cpu_siglip_ops = define_siglip_ops("cpu", cpu_siglip_forward, cpu_siglip_backward)


class CpuBackend(Backend):
    name = "cpu"
    summary = "C++ on the CPU (OpenMP, AVX2): float32 and float64 CPU tensors"
    dtypes = (torch.float32, torch.float64)
    dtype_hint = "; use backend='chunked' for half precision"

    def device_problem(self, device):
        if device.type != "cpu":
            return ValueError(f"backend='cpu' needs CPU tensors, got features on {device}")
        return None

    def problem(self, inputs):
        # An unbuilt extension is the first thing to say, even for meta tensors.
        return extension_problem(extension) or super().problem(inputs)

    def native(self, device, dtypes):
        # Half precision would be upcast; float64 only where nothing else runs it.
        return device.type == "cpu" and all(dt in self.dtypes for dt in dtypes) and available()

    def clip_op(self):
        return cpu_clip_loss_op

    def siglip_ops(self):
        return cpu_siglip_ops


BACKEND = CpuBackend()
