"""The C++ CPU backend (``backend="cpu"``): thin Python side of ``clipfast._cpu``.

The extension takes raw pointers, so this module makes the inputs contiguous
in one float dtype (float32, or float64 when either input is float64),
allocates every output, and keeps the tensors alive across each call.

Besides the CLIP and SigLIP operators it has the one-direction row loss
(``CpuRowCrossEntropyFunction`` on the ``CpuRows`` primitives): hard
negatives, ``info_nce_loss(symmetric=False)`` and ``local_loss``.
"""

from __future__ import annotations

import torch

from ._base import ROWS, SIGLIP, Backend, extension_available, extension_problem, load_extension
from ._ops import (SIGLIP_STATS_ROWS, KernelOptions, RowCrossEntropyFunction, compute_dtype,
                   define_clip_loss_op, define_siglip_ops, row_forward, without_autocast)

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


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).contiguous()


def _code(dtype: torch.dtype, ext) -> int:
    return ext.FLOAT64 if dtype == torch.float64 else ext.FLOAT32


def cpu_forward(x, y, scale, bias, options: KernelOptions):
    """(loss, stats) through the C++ kernels (see ``clipfast.backends._ops``)."""
    ext = extension()
    dtype = compute_dtype(x, y)
    xc, yc = _contiguous(x, dtype), _contiguous(y, dtype)
    n, d = xc.shape
    stats = torch.empty(7, n, dtype=dtype)  # inv_x, inv_y, row/col max and log-sum, diag
    loss = ext.forward(_code(dtype, ext), xc.data_ptr(), yc.data_ptr(), n, d, _value(scale),
                       _value(bias), options.normalize, *(row.data_ptr() for row in stats))
    return torch.tensor(loss, dtype=dtype), stats[:6].clone()


def cpu_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                 need_x: bool, need_y: bool, need_scale: bool):
    ext = extension()
    dtype = stats.dtype
    xc, yc = _contiguous(x, dtype), _contiguous(y, dtype)
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
    xc, yc = _contiguous(x, dtype), _contiguous(y, dtype)
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
    xc, yc = _contiguous(x, dtype), _contiguous(y, dtype)
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


class CpuRows:
    """The row primitives of ``RowCrossEntropyFunction`` on the C++ kernels.

    ``s`` and ``b`` are 0-dim tensors of the compute dtype (``b`` None without
    a bias), as ``row_forward`` adds the bias to the extra logits.
    """

    name = "cpu"

    def __init__(self, normalize: bool):
        self.normalize = normalize

    def _inverse_norms(self, ext, features, dtype):
        rows, d = features.shape
        inv = torch.empty(rows, dtype=dtype)
        ext.inverse_norms(_code(dtype, ext), features.data_ptr(), rows, d, self.normalize,
                          inv.data_ptr())
        return inv

    def prepare(self, queries, keys, scale, bias):
        ext = extension()
        dtype = compute_dtype(queries, keys)
        inv_q = self._inverse_norms(ext, _contiguous(queries, dtype), dtype)
        inv_k = self._inverse_norms(ext, _contiguous(keys, dtype), dtype)
        s = scale.detach().reshape(()).to(dtype)
        b = None if bias is None else bias.detach().reshape(()).to(dtype)
        return inv_q, inv_k, s, b

    def stats(self, queries, keys, inv_q, inv_k, s, b, label_offset):
        ext = extension()
        dtype = inv_q.dtype
        qc, kc = _contiguous(queries, dtype), _contiguous(keys, dtype)
        (m, d), k = qc.shape, kc.shape[0]
        out = torch.empty(3, m, dtype=dtype)  # row max, row sum exp, label logit
        ext.row_forward(_code(dtype, ext), qc.data_ptr(), kc.data_ptr(), m, k, d, _value(s),
                        _value(b), self.normalize, inv_q.data_ptr(), inv_k.data_ptr(),
                        int(label_offset), *(row.data_ptr() for row in out))
        return out[0], out[1], out[2]

    def grads(self, queries, keys, inv_q, inv_k, s, b, row_stats, label_offset, coef, needs,
              scale_meta):
        ext = extension()
        need_q, need_k, need_scale = needs
        dtype = inv_q.dtype
        qc, kc = _contiguous(queries, dtype), _contiguous(keys, dtype)
        (m, d), k = qc.shape, kc.shape[0]
        # Read through raw pointers (merging in extra logits makes new tensors).
        row_max, row_logsum = (t.contiguous() for t in row_stats)
        grad_q = torch.empty_like(qc) if need_q else None
        grad_k = torch.empty_like(kc) if need_k else None
        ds = ext.row_backward(
            _code(dtype, ext), qc.data_ptr(), kc.data_ptr(), m, k, d, _value(s), _value(b),
            self.normalize, inv_q.data_ptr(), inv_k.data_ptr(), int(label_offset),
            row_max.data_ptr(), row_logsum.data_ptr(), float(coef),
            grad_q.data_ptr() if need_q else 0, grad_k.data_ptr() if need_k else 0,
            need_q, need_k, need_scale)
        grad_scale = (torch.tensor(ds, dtype=scale_meta[1]).reshape(scale_meta[0])
                      if need_scale else None)
        return (None if grad_q is None else grad_q.to(queries.dtype),
                None if grad_k is None else grad_k.to(keys.dtype), grad_scale)


class CpuRowCrossEntropyFunction(RowCrossEntropyFunction):
    """``RowCrossEntropyFunction`` on the C++ kernels."""

    @staticmethod
    @without_autocast
    def forward(ctx, queries, keys, scale, bias, normalize: bool, label_offset: int,
                extra_logits=None):
        return row_forward(ctx, CpuRows(normalize), queries, keys, scale, bias, label_offset,
                           extra_logits)


class CpuBackend(Backend):
    name = "cpu"
    summary = "C++ on the CPU (OpenMP, AVX2): float32 and float64 CPU tensors"
    dtypes = (torch.float32, torch.float64)
    dtype_hint = "; use backend='chunked' for half precision"
    losses = frozenset({SIGLIP, ROWS})

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

    def row_loss(self, normalize, allow_tf32, block, memory_budget=0.0):
        # allow_tf32, block and memory_budget: the kernels are IEEE, size
        # their own tiles and keep no logits.
        return lambda q, k, s, b, label_offset, extra: CpuRowCrossEntropyFunction.apply(
            q, k, s, b, normalize, label_offset, extra)


BACKEND = CpuBackend()
