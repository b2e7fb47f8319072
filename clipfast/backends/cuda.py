"""The CUDA backend (``backend="cuda"``): thin Python side of ``clipfast._cuda``.

The extension takes raw pointers and the current stream's handle; this module
makes the inputs contiguous in one dtype (the common one, fp32 for a mix),
allocates every buffer with torch (so the caching allocator and its memory
statistics see them) and keeps them alive across each call.

Emulation: with ``CLIPFAST_CUDA_EMULATION=1``, ``backend="cuda"`` also takes
CPU tensors and runs the same kernels through ``clipfast._cuda_emulated``, a
CPU emulation of the CUDA subset they use (csrc/emulate/cuda_emulation.h):
slow, for tests on machines without a GPU.
"""

from __future__ import annotations

import math
import os

import torch

from .._inputs import LossInputs
from ._base import ROWS, SIGLIP, Backend, extension_available, extension_problem, load_extension
from ._ops import SIGLIP_STATS_ROWS, KernelOptions, define_clip_loss_op, define_siglip_ops
from ._stats import clip_loss_from_stats

_BUILD_HINT = (
    "the CUDA extension clipfast._cuda is not built; it is built by `pip install -e .` "
    "whenever nvcc is found (set CUDA_HOME, or CLIPFAST_CUDA=1 to make its absence an error)"
)
_CODES = {torch.float32: "FLOAT32", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16"}


_EMULATION_HINT = (
    "the CUDA emulation clipfast._cuda_emulated is not built; `pip install -e .` builds it "
    "unless CLIPFAST_CUDA_EMULATION=0"
)
# The emulation's stand-in for a GPU's multiprocessor count (grid sizing).
_EMULATED_MULTIPROCESSORS = 4


def extension(device: torch.device = torch.device("cuda")):
    """The compiled module for features on ``device`` (the emulation for CPU
    tensors), or an ImportError that says how to build it."""
    if device.type == "cuda":
        return load_extension("_cuda", "cuda", _BUILD_HINT)
    return load_extension("_cuda_emulated", "cuda", _EMULATION_HINT)


def available() -> bool:
    return extension_available(extension)


def emulation_available() -> bool:
    return extension_available(lambda: extension(torch.device("cpu")))


def emulation_enabled() -> bool:
    return os.environ.get("CLIPFAST_CUDA_EMULATION", "0") not in ("", "0")


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _EMULATED_MULTIPROCESSORS


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _splits(device: torch.device, n: int, tile: int) -> int:
    blocks = -(-n // tile)
    target = 2 * _multiprocessors(device)
    return max(1, min(blocks, int(target ** 0.5)))


def _kernel_inputs(x, y):
    """(extension, dtype, x, y): the features detached, contiguous and in one
    dtype (the common one, fp32 for a mix), as the kernels' raw pointers need."""
    dtype = x.dtype if x.dtype == y.dtype else torch.float32
    return (extension(x.device), dtype, x.detach().to(dtype).contiguous(),
            y.detach().to(dtype).contiguous())


def _uses_tensor_cores(dtype: torch.dtype, allow_tf32: bool) -> bool:
    # fp16/bf16 always run on tensor cores; fp32 does in TF32 when allowed,
    # else in IEEE fp32 FMAs.
    return dtype != torch.float32 or bool(allow_tf32)


def _value(t) -> float:
    return 0.0 if t is None else float(t.detach().reshape(()))


def cuda_forward(x, y, scale, bias, options: KernelOptions):
    """(loss, stats) through the CUDA kernels (see ``clipfast.backends._ops``)."""
    ext, dtype, xc, yc = _kernel_inputs(x, y)
    n, d = xc.shape
    f32 = dict(dtype=torch.float32, device=xc.device)
    # inv_x, inv_y, row max / log-sum, col max / log-sum (the layout of _ops'
    # stats), then the label logits.
    stats = torch.empty(7, n, **f32)
    splits = _splits(xc.device, n, ext.TILE_COLS)
    row_part = torch.empty(2, splits, n, **f32)
    col_part = torch.stack([torch.full((splits, n), float("-inf"), **f32), torch.zeros(splits, n, **f32)])
    ext.forward(getattr(ext, _CODES[dtype]), xc.data_ptr(), yc.data_ptr(), n, d, _value(scale),
                _value(bias), options.normalize, *(row.data_ptr() for row in stats), splits, splits,
                row_part[0].data_ptr(), row_part[1].data_ptr(),
                col_part[0].data_ptr(), col_part[1].data_ptr(),
                _uses_tensor_cores(dtype, options.allow_tf32), _stream(xc.device))
    loss = clip_loss_from_stats(stats[2], stats[3], stats[4], stats[5], stats[6])
    return loss, stats[:6].clone()


def cuda_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                  need_x: bool, need_y: bool, need_scale: bool):
    ext, dtype, xc, yc = _kernel_inputs(x, y)
    stats = stats.contiguous()
    n, d = xc.shape
    s_value = _value(scale)
    # grad_loss / (2N) stays on the device (the kernels read it): no host sync.
    coef = (grad_loss.float() / (2 * n)).reshape(1).contiguous()
    gx = torch.empty_like(xc) if need_x else None
    gy = torch.empty_like(yc) if need_y else None
    common = (getattr(ext, _CODES[dtype]), xc.data_ptr(), yc.data_ptr(), n, d, s_value,
              _value(bias), options.normalize, *(row.data_ptr() for row in stats), s_value,
              coef.data_ptr())
    outputs = (0 if gx is None else gx.data_ptr(), 0 if gy is None else gy.data_ptr(),
               _stream(xc.device))
    (scale_sums,) = _panel_backward(ext.backward, ext, common, outputs, xc,
                                    _uses_tensor_cores(dtype, options.allow_tf32), need_scale,
                                    need_x, need_y)
    grad_scale = None
    if need_scale:
        grad_scale = (scale_sums.sum() * coef[0]).reshape(scale.shape).to(scale.dtype)
    return (None if gx is None else gx.to(x.dtype), None if gy is None else gy.to(y.dtype),
            grad_scale)


cuda_clip_loss_op = define_clip_loss_op("cuda", cuda_forward, cuda_backward)


# The G panel and the fp32 dX^ accumulator of the backward get 3/32 of the two
# gradients' bytes (bf16's 20-bit dY^ accumulator's 4-bit plane takes 1/8, so
# the extra memory stays within 1.25x the gradients; fp16's 8-bit plane takes
# 1/4: 1.35x), but at least 32 MiB, so that small batches still get panels
# that fill a GPU.
_PANEL_BUDGET_FLOOR = 32 << 20


# The launch overhead of one panel's three kernels, in units of one 128 x 128
# tile's MMA time per unit of K (about 4 us per launch against 6 ns per K).
_PANEL_LAUNCH_COST = 2000


def split_low_bytes(d: int, dtype: torch.dtype) -> int:
    """Bytes per row of the dY^ accumulator's low plane (tiles.cu kLoBits): its
    top 16 bits live in the 16-bit gradient itself, the next 4 (bf16: 20 bits,
    11 of mantissa against the output's 7) or 8 (fp16: 24 bits, since fp16's
    10-bit output mantissa leaves a 4-bit extension too little headroom for
    ceil(N/p) rounded updates) in this plane; fp32 accumulates in the gradient."""
    return d if dtype == torch.float16 else -(-d // 2)


def panel_plan(n: int, d: int, element_bytes: int, multi_processors: int,
               align: int = 128) -> tuple:
    """(panel, ld) of the backward's square panels of G (csrc/cuda/tiles.cu).

    ld is N rounded up to ``align``. The panel p is a multiple of ``align``
    (at least one, at most ld) whose G panel (p^2 elements) plus p x d fp32
    accumulator fit in max(3 N d element_bytes / 16, 32 MiB) bytes. Among
    those, it takes the one whose launches waste least on partial rounds of
    blocks: per panel, grad_panel_kernel runs (p/128)^2 tiles with K = d and
    panel_products_kernel 2 (p/128) ceil(d/128) tiles with K = p, each in
    whole rounds of (multiprocessors x blocks per SM) blocks, plus a launch
    cost; ties go to the larger panel (fewer launches and dY^ updates).
    """
    ld = -(-n // align) * align
    budget = max(3 * n * d * element_bytes // 16, _PANEL_BUDGET_FLOOR)
    # element_bytes * p^2 + 4 d p <= budget
    p_max = int((-4 * d + math.sqrt(16 * d * d + 4 * element_bytes * budget)) / (2 * element_bytes))
    p_max = p_max // align * align
    while p_max > align and element_bytes * p_max * p_max + 4 * d * p_max > budget:
        p_max -= align
    p_max = min(max(p_max, align), ld)
    # fp16/bf16 tile kernels fit two blocks per SM, fp32 ones one.
    slots = max(1, multi_processors) * (2 if element_bytes == 2 else 1)
    d_tiles = -(-d // align)
    best = None
    for tiles in range(p_max // align, 0, -1):
        p = tiles * align
        panels = -(-n // p)
        grad = -(-tiles * tiles // slots) * d
        products = -(-2 * tiles * d_tiles // slots) * p
        cost = panels * panels * (grad + products + _PANEL_LAUNCH_COST)
        if best is None or cost < best[0]:
            best = (cost, p)
    return best[1], ld


def _panel_backward(entry, ext, common, outputs, xc, tensor_cores, need_sums, need_x, need_y,
                    sums: int = 1):
    """The backward by square panels of G (csrc/cuda/tiles.cu) through
    ``entry`` (ext.backward or ext.siglip_backward); returns ``sums`` tensors
    of per-panel unscaled sums: sum G cos (the scale gradient), then, for
    SigLIP, sum G (the bias gradient)."""
    n, d = xc.shape
    panel, ld = panel_plan(n, d, xc.element_size(), _multiprocessors(xc.device),
                           ext.PANEL_ALIGN)
    device = xc.device
    f32 = dict(dtype=torch.float32, device=device)
    panels = -(-n // panel)
    tiles = panel // ext.PANEL_ALIGN
    g_panel = torch.empty(panel, panel, dtype=xc.dtype, device=device)
    x_acc = torch.empty(panel, d, **f32) if need_x else None
    y_lo = (torch.empty(n, split_low_bytes(d, xc.dtype), dtype=torch.uint8, device=device)
            if need_y and xc.dtype != torch.float32 else None)
    sum_part = torch.empty(sums * tiles * tiles, **f32) if need_sums else None
    accs = torch.zeros(sums, panels * panels, **f32)

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    entry(*common, panel, ld, g_panel.data_ptr(), ptr(x_acc), ptr(y_lo), ptr(sum_part),
          *(acc.data_ptr() for acc in accs), bool(tensor_cores), bool(need_sums), *outputs)
    return tuple(accs)


def cuda_siglip_forward(x, y, scale, bias, options: KernelOptions, positives: bool = True):
    """SigLIP's (loss, stats = [inv_x, inv_y]) through the CUDA kernels (see
    ``clipfast.backends._ops``); the loss is fp32."""
    ext, dtype, xc, yc = _kernel_inputs(x, y)
    n, d = xc.shape
    f32 = dict(dtype=torch.float32, device=xc.device)
    stats = torch.empty(SIGLIP_STATS_ROWS, n, **f32)
    splits = _splits(xc.device, n, ext.TILE_COLS)
    loss_part = torch.empty(splits * splits, **f32)
    ext.siglip_forward(getattr(ext, _CODES[dtype]), xc.data_ptr(), yc.data_ptr(), n, d,
                       _value(scale), _value(bias), options.normalize, stats[0].data_ptr(),
                       stats[1].data_ptr(), bool(positives), splits, splits, loss_part.data_ptr(),
                       _uses_tensor_cores(dtype, options.allow_tf32), _stream(xc.device))
    # The block sums are fp32 sums of fp64 per-thread sums; add them in fp64.
    loss = (loss_part.double().sum() / n).float()
    return loss, stats


def cuda_siglip_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                         need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
                         positives: bool = True):
    ext, dtype, xc, yc = _kernel_inputs(x, y)
    stats = stats.contiguous()
    n, d = xc.shape
    s_value = _value(scale)
    need_bias = need_bias and bias is not None
    # grad_loss / N stays on the device (the kernels read it): no host sync.
    coef = (grad_loss.float() / n).reshape(1).contiguous()
    gx = torch.empty_like(xc) if need_x else None
    gy = torch.empty_like(yc) if need_y else None
    common = (getattr(ext, _CODES[dtype]), xc.data_ptr(), yc.data_ptr(), n, d, s_value,
              _value(bias), options.normalize, stats[0].data_ptr(), stats[1].data_ptr(),
              bool(positives), s_value, coef.data_ptr())
    outputs = (0 if gx is None else gx.data_ptr(), 0 if gy is None else gy.data_ptr(),
               _stream(xc.device))
    scale_sums, bias_sums = _panel_backward(
        ext.siglip_backward, ext, common, outputs, xc,
        _uses_tensor_cores(dtype, options.allow_tf32), need_scale or need_bias, need_x, need_y,
        sums=2)
    grad_scale = grad_bias = None
    if need_scale:
        grad_scale = (scale_sums.sum() * coef[0]).reshape(scale.shape).to(scale.dtype)
    if need_bias:
        grad_bias = (bias_sums.sum() * coef[0]).reshape(bias.shape).to(bias.dtype)
    return (None if gx is None else gx.to(x.dtype), None if gy is None else gy.to(y.dtype),
            grad_scale, grad_bias)


cuda_siglip_ops = define_siglip_ops("cuda", cuda_siglip_forward, cuda_siglip_backward)


class CudaBackend(Backend):
    name = "cuda"
    summary = ("CUDA C++ tile engine: tensor cores for float16/bfloat16 (and TF32); "
               "CPU tensors through the emulation with CLIPFAST_CUDA_EMULATION=1")
    # Its kernels have no row loss or block primitives of their own: the
    # Triton ones stand in for them where Triton runs (see Backend.stand_in),
    # chunked's elsewhere (CPU tensors through the emulation without the
    # Triton interpreter).
    stand_in = "triton"
    losses = frozenset({SIGLIP, ROWS})

    def device_problem(self, device):
        if device.type != "cuda" and not (device.type == "cpu" and emulation_enabled()):
            return extension_problem(extension) or ValueError(
                f"backend='cuda' needs CUDA tensors, got features on {device} (set "
                "CLIPFAST_CUDA_EMULATION=1 to run its kernels on CPU tensors through the "
                "slow CPU emulation, for tests)")
        return extension_problem(extension, device)

    def native(self, device, dtypes):
        return (device.type == "cuda" and all(dt in self.dtypes for dt in dtypes)
                and available())

    def clip_op(self):
        return cuda_clip_loss_op

    def siglip_ops(self):
        return cuda_siglip_ops

    def row_loss(self, normalize, allow_tf32, block, memory_budget=0.0):
        """The one-direction loss on the stand-in's fused row kernels
        (Triton's, on the same device; chunked's where Triton cannot run the
        features), chosen per call from the features."""
        from .chunked import BACKEND as CHUNKED
        from .triton import BACKEND as TRITON

        def row(q, k, s, b, label_offset, extra):
            runs = TRITON.problem(LossInputs(q, k, s, b)) is None
            stand_in = TRITON if runs else CHUNKED
            return stand_in.row_loss(normalize, allow_tf32, 0, memory_budget)(
                q, k, s, b, label_offset, extra)

        return row


BACKEND = CudaBackend()
