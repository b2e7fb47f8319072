"""The hybrid backend's panel loops: library GEMMs for the products, the
epilogue kernels (``epilogue_kernels``) for everything else.

Forward, per row panel of P rows: one GEMM writes the fp32 dot products of
the panel's rows against all K columns (``torch.mm(..., out_dtype=float32)``
for fp16/bf16 operands where torch has it on the device, an fp32 product
otherwise); one epilogue reads them once for the rows' log-sum-exp, the
columns' partial statistics and the label logits (or SigLIP's sum), and a
merge folds the partials into the running statistics.

Backward, per panel: the dots again (one GEMM, or the panel the forward kept
under a memory budget), one epilogue that turns them into the GEMM operand
W = dloss/dL * s * inv_x * inv_y (over the dots' own bytes where nothing else
needs them), then dX_panel = W Y' (finished into the input gradient's rows at
once) and dY += W^T X'_panel (an fp32 accumulator, finished at the end).
Four GEMMs per panel pair in all, three for a kept panel.

The inverse norms are folded into the epilogues, so the GEMMs read the
feature rows themselves: no normalised copies. Rows whose norms would take
the dots or W out of range get scaled by a power of two first (exact; see
``Operands``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import triton

from .._ops import kept_rows_of
from ..triton._runtime import interpreter_requested as interpreter_active
from ..triton.launchers import _one_launch_at_a_time, finish_feature_grad, inverse_norms
from .epilogue_kernels import (SIGMOID, SOFTMAX, _grad_panel_kernel, _merge_stats_kernel,
                               _sigmoid_sum_kernel, _softmax_stats_kernel)

__all__ = ["SIGMOID", "SOFTMAX", "Operands", "backward_panels", "kept_rows", "operands",
           "panel_rows", "sigmoid_sum", "softmax_stats"]

# fp32 dots of one scratch panel by default (2^27: 512 MB), and the fewest rows
# a default panel has (thinner panels make the GEMMs inefficient).
DEFAULT_PANEL_ELEMENTS = 1 << 27
MIN_PANEL_ROWS = 256
KEPT_ITEMSIZE = 4  # the forward keeps fp32 dots


def panel_rows(m: int, k: int, block: int) -> int:
    """Rows per panel of an M x K block: ``block`` (panel_size) when given,
    else about DEFAULT_PANEL_ELEMENTS / K, at least MIN_PANEL_ROWS."""
    if block:
        return max(1, min(m, block))
    return max(1, min(m, max(MIN_PANEL_ROWS, DEFAULT_PANEL_ELEMENTS // max(k, 1))))


def kept_rows(m: int, k: int, block: int, memory_budget: float,
              itemsize: int = KEPT_ITEMSIZE) -> int:
    """Rows of fp32 dots the forward keeps for the backward under
    ``memory_budget`` bytes (whole panels)."""
    return kept_rows_of(m, k, panel_rows(m, k, block), memory_budget, KEPT_ITEMSIZE)


# --------------------------------------------------------------------------- #
# The GEMMs
# --------------------------------------------------------------------------- #

_PROBE_LOCK = threading.Lock()
_PROBES: dict = {}  # (device type, what) -> works
_TF32_LOCK = threading.Lock()


def _probe(device: torch.device, what: str) -> bool:
    """Whether torch on ``device`` takes fp16/bf16 operands to an fp32 result
    (``out_dtype``, torch >= 2.8 on CUDA): ``what`` is "mm" (into a given
    out) or "addmm" (accumulating into its fp32 input), probed once per
    device type on a 16 x 16 product whose answer is known."""
    key = (device.type, what)
    if key not in _PROBES:
        with _PROBE_LOCK:
            if key not in _PROBES:
                ok = False
                if device.type == "cuda":
                    try:
                        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
                        out = torch.zeros(16, 16, dtype=torch.float32, device=device)
                        if what == "mm":
                            torch.mm(a, a, out_dtype=torch.float32, out=out)
                        else:
                            torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
                        ok = bool(out[0, 0].item() == 16.0)
                    except (TypeError, RuntimeError, NotImplementedError):
                        ok = False
                _PROBES[key] = ok
    return _PROBES[key]


def half_gemm_has_fp32_out(device: torch.device) -> bool:
    """Whether half operands multiply straight to fp32 here. Without it the
    operands are promoted to fp32 first: the same products (half values are
    exact in fp32 and in TF32) at the fp32 / TF32 rate."""
    return _probe(device, "mm")


@contextlib.contextmanager
def _fp32_precision(device: torch.device, allow_tf32: bool):
    """fp32 CUDA products with or without TF32 as the call asked, whatever
    torch's global setting (restored after; serialised, since it is global)."""
    if device.type != "cuda" or torch.backends.cuda.matmul.allow_tf32 == allow_tf32:
        yield
        return
    with _TF32_LOCK:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, allow_tf32: bool) -> None:
    """out (fp32) = a @ b; a and b share a dtype (the operand dtype, or fp32)."""
    if a.dtype == torch.float32:
        with _fp32_precision(a.device, allow_tf32):
            torch.mm(a, b, out=out)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, allow_tf32: bool) -> None:
    """acc (fp32) += a @ b."""
    if a.dtype == torch.float32:
        with _fp32_precision(a.device, allow_tf32):
            acc.addmm_(a, b)
    elif _probe(acc.device, "addmm"):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += torch.mm(a, b, out_dtype=torch.float32)


def operand_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """The GEMMs' operand dtype: a shared half dtype, else fp32 (a mix is
    computed in fp32, never less accurate than either input)."""
    return x.dtype if x.dtype == y.dtype else torch.float32


# Inverse norms outside [2^-40, 2^40] take the dots |x| |y| cos out of fp32's
# range: such rows are fed to the forward GEMMs times a power of two near their
# inverse norm (fp16 rows never are: below 65504 sqrt(d) and above 2^-24).
_INV_BOUND = 2.0 ** 40


def _pow2_near(values: torch.Tensor, exponent_shift: int) -> torch.Tensor:
    """2^(e + exponent_shift) for values = m 2^e (0.5 <= m < 1); 1 where a
    value is zero or not finite."""
    _, exponent = torch.frexp(values)
    one = torch.ones_like(values)
    return torch.where(torch.isfinite(values) & (values > 0),
                       torch.ldexp(one, exponent + exponent_shift), one)


@dataclass
class Operands:
    """The GEMM operands of one M x K block and what the epilogues fold in.

    Forward (the dots and their recomputation): ``x``, ``y`` are the feature
    rows themselves, rows times ``pow2_*`` (None: no row scaled) where a norm
    is out of range, promoted to fp32 where torch has no half GEMM with an
    fp32 result. ``inv_x``, ``inv_y``: the inverse norms of those rows (the
    features' own divided by pow2; ones without normalisation).

    Backward products (``backward()``): fp32 features multiply W in fp32 (TF32
    if allowed) over the forward operands. fp16/bf16 features multiply an fp16
    W over fp16 copies of the rows times a power of two near their inverse
    norm (``_fp16_rows``): fp16 keeps 11 bits of W where bf16 keeps 8 (the
    rounding of a bf16 W alone gave 2-5x the error of rounding the exact
    gradient), bf16 rows convert exactly (barring entries 2^24 below the
    row's norm), and W's folds stay in fp16's range whatever the norms.
    """

    x: torch.Tensor
    y: torch.Tensor
    inv_x: torch.Tensor
    inv_y: torch.Tensor
    pow2_x: Optional[torch.Tensor]
    pow2_y: Optional[torch.Tensor]
    normalize: bool
    allow_tf32: bool
    promoted: bool  # half features, fp32 products (no fp32-result half GEMM here)
    features: Tuple[torch.Tensor, torch.Tensor]

    def feature_inverse_norms(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The inverse norms of the features themselves (what the stats keep)."""
        return tuple(inv if pow2 is None else inv * pow2
                     for inv, pow2 in ((self.inv_x, self.pow2_x), (self.inv_y, self.pow2_y)))

    def backward_for_sums(self) -> "ProductOperands":
        """Operands when only the scalar gradients are wanted: no copies."""
        return ProductOperands(self.x, self.y, self.inv_x, self.inv_y, None, None,
                               torch.float32, self.allow_tf32, False)

    def backward(self) -> "ProductOperands":
        x, y = self.features
        if operand_dtype(x, y) == torch.float32:
            return ProductOperands(self.x, self.y, self.inv_x, self.inv_y, self.pow2_x,
                                   self.pow2_y, torch.float32, self.allow_tf32, False)
        inv_x, inv_y = self.feature_inverse_norms()
        sides = [_fp16_rows(f, inv, self.normalize, self.promoted)
                 for f, inv in ((x, inv_x), (y, inv_y))]
        (x16, fold_x, q_x), (y16, fold_y, q_y) = sides
        return ProductOperands(x16, y16, fold_x, fold_y, q_x, q_y, torch.float16,
                               self.allow_tf32, self.promoted)


@dataclass
class ProductOperands:
    """The backward products' operands: ``x``, ``y`` (rows times ``unscale_*``,
    None: times 1), the per-row factors W folds in (``fold_*`` = the rows'
    inverse norms divided by those powers of two) and W's dtype."""

    x: torch.Tensor
    y: torch.Tensor
    fold_x: torch.Tensor
    fold_y: torch.Tensor
    unscale_x: Optional[torch.Tensor]
    unscale_y: Optional[torch.Tensor]
    w_dtype: torch.dtype
    allow_tf32: bool
    promoted: bool


def _fp16_rows(features, inv, normalize: bool, promote: bool):
    """(fp16 rows times q, fold = inv / q, q) with q a power of two per row.

    Normalised: q near the row's inverse norm, so every fold is in [1, 2):
    W's entries then span only what G spans, whatever the rows' norms (rows
    below eps, clamped as x / eps, become tiny rows whose share of dY is as
    tiny). Unnormalised: q puts the row's largest |entry| in [0.5, 1).
    """
    if normalize:
        q = _pow2_near(inv, -1)
    else:
        q = _pow2_near(features.detach().abs().amax(dim=1).float(), 0).reciprocal()
    rows = (features.float() * q[:, None]).to(torch.float16)
    if promote:
        rows = rows.float()
    return rows, (inv / q).contiguous(), q


def _operand(features, inv, normalize: bool, op_dtype: torch.dtype, promote: bool):
    rows = features if features.dtype == op_dtype else features.to(op_dtype)
    pow2 = None
    op_inv = inv
    if normalize and op_dtype != torch.float16:
        extreme = (inv < 1.0 / _INV_BOUND) | (inv > _INV_BOUND)
        if bool(extreme.any()):  # one host sync; the common case copies nothing
            pow2 = torch.where(extreme, _pow2_near(inv, -1), torch.ones_like(inv))
            # Powers of two: exact (bar subnormals), so the cosines are those
            # of the rows themselves.
            rows = (rows.float() * pow2[:, None]).to(op_dtype)
            op_inv = inv / pow2
    if promote and rows.dtype != torch.float32:
        rows = rows.float()
    return rows, op_inv, pow2


def operands(x, y, normalize: bool, allow_tf32: bool, inv_x=None, inv_y=None) -> Operands:
    """The operands of the block X (M x d) against Y (K x d); the inverse
    norms are computed unless given (fp32, of the features themselves)."""
    if inv_x is None:
        inv_x = inverse_norms(x, normalize)
    if inv_y is None:
        inv_y = inverse_norms(y, normalize)
    op_dtype = operand_dtype(x, y)
    promote = op_dtype != torch.float32 and not half_gemm_has_fp32_out(x.device)
    x_op, op_inv_x, pow2_x = _operand(x, inv_x, normalize, op_dtype, promote)
    y_op, op_inv_y, pow2_y = _operand(y, inv_y, normalize, op_dtype, promote)
    return Operands(x_op, y_op, op_inv_x.contiguous(), op_inv_y.contiguous(), pow2_x, pow2_y,
                    normalize, allow_tf32, promote, (x, y))


# --------------------------------------------------------------------------- #
# Launch configs
# --------------------------------------------------------------------------- #


def _programs_target(device: torch.device) -> int:
    if interpreter_active() or device.type != "cuda":
        # Enough programs that the column splits run at the sizes CI affords.
        return 32
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# The epilogues that turn dots into logits are compiled without FMA
# contraction: the forward's statistics and the backward's recomputed logits
# must round alike (the forward kernels and the gradient kernel are different
# programs, and ptxas would fuse cos * scale + bias differently in each).


def _stats_config() -> dict:
    if interpreter_active():
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=1)
    # From the compiled code (python -m clipfast.aot_check): 32 x 256 spilled
    # 8-40 bytes at 255 registers wherever K is not a multiple of 16 (no
    # vectorised loads), on sm_80 and sm_90. 64 x 64: at most 233-252
    # registers there, no spill (Triton 3.6, 3.7.1, 3.9.0), 128 at aligned K
    # (two CTAs per SM), 5% more instructions per logit than 32 x 256 (1.13 vs
    # 1.07 warp instructions, sm_90, CLIP), and half
    # the column partials of 32-row blocks.
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8)


def _grad_config() -> dict:
    if interpreter_active():
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=1)
    # One program per panel row (the grid is rows / BLOCK_M): 16-row blocks
    # gave 128 programs for a 2048-row panel, 64 for N = 131072's 1024 rows,
    # 16 for the 256-row panels of N = 2^20, on 132 SMs, and spilled up to 32
    # bytes at 255 registers where K is not a multiple of 16. 1 x 2048: at
    # most 79 registers, no spill, and the kernel stays HBM-bound.
    return dict(BLOCK_M=1, BLOCK_N=2048, num_warps=8)


def _column_splits(rows: int, k: int, cfg: dict, device) -> Tuple[int, int]:
    """(splits, columns per split) of a forward panel: enough programs to fill
    the GPU when the panel has few row blocks."""
    row_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
    tiles = triton.cdiv(k, cfg["BLOCK_N"])
    splits = max(1, min(tiles, _programs_target(device) // row_blocks))
    cols = triton.cdiv(tiles, splits) * cfg["BLOCK_N"]
    return triton.cdiv(k, cols), cols


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #


class _Panels:
    """Row panels of the block and the buffer each panel's dots land in: the
    kept rows (forward: written there, backward: read there), else one
    scratch panel reused."""

    def __init__(self, ops: Operands, block: int, kept: Optional[torch.Tensor]):
        self.ops = ops
        self.m, self.k = ops.x.shape[0], ops.y.shape[0]
        self.rows = panel_rows(self.m, self.k, block)
        self.kept = kept
        self.kept_rows = 0 if kept is None else kept.shape[0]
        self._scratch = None

    def __iter__(self):
        for start in range(0, self.m, self.rows):
            yield start, min(self.m, start + self.rows)

    def is_kept(self, stop: int) -> bool:
        return stop <= self.kept_rows

    def scratch(self, rows: int) -> torch.Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(self.rows, self.k, dtype=torch.float32,
                                        device=self.ops.x.device)
        return self._scratch[:rows]

    def dots(self, start: int, stop: int, recompute: bool = True) -> torch.Tensor:
        """The panel's fp32 dots: kept ones as they are, else from one GEMM."""
        if self.is_kept(stop) and not recompute:
            return self.kept[start:stop]
        out = self.kept[start:stop] if self.is_kept(stop) else self.scratch(stop - start)
        _mm_into(self.ops.x[start:stop], self.ops.y.t(), out, self.ops.allow_tf32)
        return out


def _scalars(scale, bias):
    return scale, (scale if bias is None else bias)


def softmax_stats(ops: Operands, scale, bias, diag_offset: Optional[int], with_cols: bool,
                  block: int, kept: Optional[torch.Tensor] = None):
    """(row_max, row_sum, col_max, col_sum, diag) of the block's logits
    L = s * cos + b: per row and column the max and sum exp(L - max) (col_*
    None without ``with_cols``), and ``diag[i] = L[i, i + diag_offset]`` (None
    without labels). ``kept``: (R, K) fp32 rows that receive the dots of the
    first R rows for the backward. ``scale``/``bias``: 1-element fp32."""
    panels = _Panels(ops, block, kept)
    m, k, device = panels.m, panels.k, ops.x.device
    cfg = _stats_config()
    row_max = torch.empty(m, dtype=torch.float32, device=device)
    row_sum = torch.empty(m, dtype=torch.float32, device=device)
    diag = torch.empty(m, dtype=torch.float32, device=device) if diag_offset is not None else None
    col_max = col_sum = None
    if with_cols:
        col_max = torch.full((k,), float("-inf"), dtype=torch.float32, device=device)
        col_sum = torch.zeros(k, dtype=torch.float32, device=device)
    row_part = torch.empty(2, 0, dtype=torch.float32, device=device)
    row_blocks = triton.cdiv(panels.rows, cfg["BLOCK_M"])
    col_part = (torch.empty(2, row_blocks * k, dtype=torch.float32, device=device)
                if with_cols else row_part)
    scale_ptr, bias_ptr = _scalars(scale, bias)
    for start, stop in panels:
        rows = stop - start
        dots = panels.dots(start, stop)
        splits, cols_per_split = _column_splits(rows, k, cfg, device)
        blocks = triton.cdiv(rows, cfg["BLOCK_M"])
        if row_part.shape[1] < splits * rows:
            # A ragged last panel has fewer row blocks, hence more splits.
            row_part = torch.empty(2, splits * rows, dtype=torch.float32, device=device)
        with _one_launch_at_a_time():
            _softmax_stats_kernel[(blocks, splits)](
                dots, dots.stride(0), rows, k, ops.inv_x[start:stop], ops.inv_y,
                scale_ptr, bias_ptr, row_part[0], row_part[1], col_part[0], col_part[1],
                diag[start:stop] if diag is not None else row_max,
                (diag_offset or 0) + start, cols_per_split,
                HAS_BIAS=bias is not None, HAS_DIAG=diag is not None, WITH_COLS=with_cols,
                NORMALIZE=ops.normalize, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                num_warps=cfg["num_warps"], enable_fp_fusion=False)
            _merge_stats_kernel[(triton.cdiv(rows, 256),)](
                row_part[0], row_part[1], splits, rows, row_max[start:stop],
                row_sum[start:stop], ACCUMULATE=False, BLOCK=256)
            if with_cols:
                _merge_stats_kernel[(triton.cdiv(k, 256),)](
                    col_part[0], col_part[1], blocks, k, col_max, col_sum,
                    ACCUMULATE=True, BLOCK=256)
    return row_max, row_sum, col_max, col_sum, diag


def sigmoid_sum(ops: Operands, scale, bias, positives: bool, block: int,
                kept: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp64 sum over the block of -logsigmoid(z L) (z = +1 on the diagonal
    with ``positives``, -1 elsewhere)."""
    panels = _Panels(ops, block, kept)
    k, device = panels.k, ops.x.device
    cfg = _stats_config()
    scale_ptr, bias_ptr = _scalars(scale, bias)
    sums = []
    for start, stop in panels:
        rows = stop - start
        dots = panels.dots(start, stop)
        splits, cols_per_split = _column_splits(rows, k, cfg, device)
        blocks = triton.cdiv(rows, cfg["BLOCK_M"])
        part = torch.empty(blocks * splits, dtype=torch.float32, device=device)
        with _one_launch_at_a_time():
            _sigmoid_sum_kernel[(blocks, splits)](
                dots, dots.stride(0), rows, k, ops.inv_x[start:stop], ops.inv_y,
                scale_ptr, bias_ptr, part, start, cols_per_split,
                HAS_BIAS=bias is not None, POSITIVES=positives, NORMALIZE=ops.normalize,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                enable_fp_fusion=False)
        sums.append(part)
    return torch.cat(sums).sum(dtype=torch.float64)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class GradSpec:
    """What dloss/dL is on a block: the loss (SOFTMAX or SIGMOID), the row and
    column coefficients (1-element fp32 tensors; col_coef None: no column
    term), the softmax statistics ((max, logsum) pairs, None where absent)
    and the label offset (None: no labels)."""

    loss: int
    row_coef: torch.Tensor
    col_coef: Optional[torch.Tensor]
    row_stats: Optional[Tuple[torch.Tensor, torch.Tensor]]
    col_stats: Optional[Tuple[torch.Tensor, torch.Tensor]]
    diag_offset: Optional[int]


def _w_scale(prod: ProductOperands, scale, spec: GradSpec) -> torch.Tensor:
    """The power of two W carries: for fp16 W, the one that puts the largest
    |W| possible just below 2^14 (small weights stay normal, none overflows);
    1 for fp32 W. On the device: no host sync."""
    one = torch.ones(1, dtype=torch.float32, device=scale.device)
    if prod.w_dtype != torch.float16:
        return one
    coef = spec.row_coef.abs() + (0 if spec.col_coef is None else spec.col_coef.abs())
    bound = coef * scale * prod.fold_x.max() * prod.fold_y.max()
    _, exponent = torch.frexp(bound)
    # Clamped so that w_scale and 1 / w_scale stay normal fp32 numbers (rows
    # below 1e-12 on both sides give bounds near 1e-36).
    shift = torch.ldexp(one, (14 - exponent).clamp(-126, 126))
    return torch.where(torch.isfinite(bound) & (bound > 0), shift, one).reshape(1)


def backward_panels(ops: Operands, prod: ProductOperands, scale, bias, spec: GradSpec,
                    w_scale: torch.Tensor, block: int, kept: Optional[torch.Tensor],
                    on_x_rows: Optional[Callable], y_acc: Optional[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block's panel loop. Per panel, W from the epilogue, then
    ``on_x_rows(start, stop, W Y_prod)`` (fp32 rows of w_scale * fold_x * dX^)
    and ``y_acc += W^T X_prod`` (w_scale * fold_y * dY^). Returns (fp64 sum of
    G * cos, fp64 sum of G (SIGMOID; 0 otherwise))."""
    panels = _Panels(ops, block, kept)
    k, device = panels.k, ops.x.device
    cfg = _grad_config()
    scale_ptr, bias_ptr = _scalars(scale, bias)
    row_stats = spec.row_stats or (scale, scale)
    col_stats = spec.col_stats or (scale, scale)
    w_scratch = None
    scale_parts, bias_parts = [], []
    for start, stop in panels:
        rows = stop - start
        dots = panels.dots(start, stop, recompute=False)
        if panels.is_kept(stop):
            # Kept dots stay intact (a retain_graph backward reads them again).
            if w_scratch is None:
                w_scratch = torch.empty(panels.rows, k, dtype=prod.w_dtype, device=device)
            w = w_scratch[:rows]
        elif prod.w_dtype == torch.float32:
            w = dots
        else:
            # Row i's W over the first half of row i's own fp32 bytes.
            w = dots.view(prod.w_dtype)[:, :k]
        in_place = w.data_ptr() == dots.data_ptr() and w.element_size() != dots.element_size()
        blocks = triton.cdiv(rows, cfg["BLOCK_M"])
        parts = torch.empty(2, blocks, dtype=torch.float32, device=device)
        with _one_launch_at_a_time():
            _grad_panel_kernel[(blocks,)](
                dots, dots.stride(0), w, w.stride(0), rows, k,
                ops.inv_x[start:stop], ops.inv_y, prod.fold_x[start:stop], prod.fold_y,
                scale_ptr, bias_ptr,
                spec.row_coef, spec.col_coef if spec.col_coef is not None else spec.row_coef,
                w_scale,
                row_stats[0][start:stop], row_stats[1][start:stop], col_stats[0], col_stats[1],
                (spec.diag_offset or 0) + start, parts[0], parts[1],
                LOSS=spec.loss, HAS_BIAS=bias is not None, HAS_DIAG=spec.diag_offset is not None,
                HAS_ROW=spec.row_stats is not None, HAS_COL=spec.col_stats is not None,
                NORMALIZE=ops.normalize, IN_PLACE=in_place,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                enable_fp_fusion=False)
        scale_parts.append(parts[0])
        bias_parts.append(parts[1])
        # Promoted operands (no half GEMM with an fp32 result here): W rounded
        # to fp16 as on the GPU, then multiplied in fp32 (exactly the products).
        w_mm = w.float() if prod.promoted else w
        if on_x_rows is not None:
            grad_rows = torch.empty(rows, prod.y.shape[1], dtype=torch.float32, device=device)
            _mm_into(w_mm, prod.y, grad_rows, prod.allow_tf32)
            on_x_rows(start, stop, grad_rows)
        if y_acc is not None:
            _addmm_(y_acc, w_mm.t(), prod.x[start:stop], prod.allow_tf32)
    scale_sum = torch.cat(scale_parts).sum(dtype=torch.float64)
    bias_sum = (torch.cat(bias_parts).sum(dtype=torch.float64) if spec.loss == SIGMOID
                else torch.zeros((), dtype=torch.float64, device=device))
    return scale_sum, bias_sum


def finish_rows(acc: torch.Tensor, features: torch.Tensor, inv: torch.Tensor,
                unscale: Optional[torch.Tensor], factor: torch.Tensor, normalize: bool,
                out: torch.Tensor) -> None:
    """out = the input gradient of rows whose fp32 accumulator holds
    fold * dX^ / factor, fold = inv / unscale (see ``backward_panels``):
    normalisation backward and the cast to the input dtype in one kernel."""
    if unscale is not None:
        acc *= unscale[:, None]
    finish_feature_grad(acc, features, inv, factor, normalize, True, out)


def feature_grads(x, y, inv_x, inv_y, ops: Operands, scale, bias, spec: GradSpec, block: int,
                  kept, need_x: bool, need_y: bool):
    """(grad_x, grad_y, sum G cos, sum G) of one block, in the inputs' dtypes;
    inv_x, inv_y: the features' own inverse norms."""
    prod = ops.backward() if (need_x or need_y) else ops.backward_for_sums()
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    y_acc = (torch.zeros(y.shape, dtype=torch.float32, device=y.device) if need_y else None)
    w_scale = _w_scale(prod, scale, spec)
    unscale = w_scale.reciprocal()

    def on_x_rows(start, stop, rows_acc):
        finish_rows(rows_acc, x[start:stop], inv_x[start:stop],
                    None if prod.unscale_x is None else prod.unscale_x[start:stop],
                    unscale, ops.normalize, grad_x[start:stop])

    scale_sum, bias_sum = backward_panels(
        ops, prod, scale, bias, spec, w_scale, block, kept, on_x_rows if need_x else None, y_acc)
    grad_y = None
    if need_y:
        grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        finish_rows(y_acc, y, inv_y, prod.unscale_y, unscale, ops.normalize, grad_y)
    return grad_x, grad_y, scale_sum, bias_sum
