"""The C++ CPU backend (``backend="cpu"``): thin Python side of ``clipfast._cpu``.

The extension takes raw pointers, so this module makes the inputs contiguous
in one float dtype (float32, or float64 when either input is float64),
allocates every output, and keeps the tensors alive across each call.
"""

from __future__ import annotations

import torch

from ._inputs import LossInputs, extension_available, load_extension
from .chunked import exact_zero_bias_grad

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


class CpuClipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, normalize: bool):
        ext = extension()
        dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        xc, yc = x.detach().to(dtype).contiguous(), y.detach().to(dtype).contiguous()
        n, d = xc.shape
        stats = torch.empty(7, n, dtype=dtype)  # inv_x, inv_y, row/col max and log-sum, diag
        s_value = float(scale.detach().reshape(()))
        b_value = float(bias.detach().reshape(())) if bias is not None else 0.0
        loss = ext.forward(_code(dtype, ext), xc.data_ptr(), yc.data_ptr(), n, d, s_value, b_value,
                           bool(normalize), *(row.data_ptr() for row in stats))
        ctx.save_for_backward(xc, yc, stats)
        ctx.meta = (s_value, b_value, bool(normalize), x.dtype, y.dtype, scale.shape, scale.dtype,
                    None if bias is None else (bias.shape, bias.dtype))
        return torch.tensor(loss, dtype=dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        ext = extension()
        xc, yc, stats = ctx.saved_tensors
        s_value, b_value, normalize, x_dtype, y_dtype, scale_shape, scale_dtype, bias_meta = ctx.meta
        need_x, need_y, need_scale, need_bias = ctx.needs_input_grad[:4]
        n, d = xc.shape
        grad_x = torch.empty_like(xc) if need_x else None
        grad_y = torch.empty_like(yc) if need_y else None
        g = float(grad_loss)
        grad_scale = grad_bias = None
        if need_x or need_y or need_scale:
            ds = ext.backward(_code(xc.dtype, ext), xc.data_ptr(), yc.data_ptr(), n, d, s_value,
                              b_value, normalize, *(row.data_ptr() for row in stats[:6]), g,
                              grad_x.data_ptr() if need_x else 0,
                              grad_y.data_ptr() if need_y else 0, need_x, need_y, need_scale)
            if need_scale:
                grad_scale = torch.tensor(ds, dtype=scale_dtype).reshape(scale_shape)
        if need_bias:
            grad_bias = exact_zero_bias_grad(stats[3], stats[5], grad_loss.to(stats.dtype), *bias_meta)
        return (None if grad_x is None else grad_x.to(x_dtype),
                None if grad_y is None else grad_y.to(y_dtype), grad_scale, grad_bias, None)


def cpu_clip_loss(inputs: LossInputs, normalize: bool = True) -> torch.Tensor:
    return CpuClipLossFunction.apply(inputs.image_features, inputs.text_features,
                                     inputs.logit_scale, inputs.logit_bias, normalize)
