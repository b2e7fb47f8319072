"""Launchers of the Triton kernels: tile configs, grids, panel sizing and the
Python functions that start the kernels of ``forward_kernels`` and
``backward_kernels``, for both losses.

Every choice a launch depends on (dot dtype, input precision, tiles, panel
side, grid) is made here, from the inputs and the options. ``aot.py``
compiles the kernels through these very functions, so every configuration
they can choose is checked for compile errors, spills and shared memory
(``python -m clipfast.aot_check``).

The backward passes of both losses run one panel loop (``_run_panels``):
per panel of the logits a loss-specific kernel writes the gradient panel G,
then ``_panel_grads_kernel`` accumulates dX^ += G Y^ and dY^ += G^T X^.

SigLIP's tiles and registers were chosen from the compiled code (``python -m
clipfast.aot_check``, ``python -m clipfast.perfmodel --loss siglip``): the
epilogue is cheap enough (about 20 instructions a logit) and needs no state
across tiles, so 128 x 128 forward tiles fit in 128 registers on sm_90
without normalisation and two CTAs share an SM, one's epilogue overlapping
the other's MMAs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._stats import merge_partial_sums
from ._runtime import interpreter_requested as interpreter_active
from .backward_kernels import (_finish_grad_kernel, _grad_logits_kernel, _panel_grads_kernel,
                               _siglip_grad_kernel)
from .forward_kernels import _forward_tiles_kernel, _inverse_norms_kernel, _siglip_forward_kernel

_NORM_EPS = 1e-12
_TORCH_TO_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}

# Bounds of the backward's default panel side (``_panel_size``).
_MIN_PANEL = 2048
_MAX_PANEL = 8192

# The forward and the backward's recomputation must round every logit alike
# (see _tile_logits). With FP contraction on, the compiler fused the
# backward's ``logits - row_max`` into one FMA on the unrounded product
# ``cosine * scale``, which the forward, needing the rounded logits for its
# max, did not: an ulp apart exactly where a one-hot softmax makes it a
# spurious gradient. Both tile kernels are therefore compiled without FP
# contraction (a ptxas --fmad=false build); the AOT check asserts it from the
# PTX. The GEMM-only kernels keep contraction.
_LOGIT_FUSION = False

# Ahead-of-time compilation (``aot.py``) sizes grids for the GPU it compiles
# for, which this process need not have: it sets the SM count here.
_AOT_SM_COUNT: Optional[int] = None

# The interpreter runs a kernel by patching triton.language process-wide for
# the length of the launch and restoring it afterwards, so two Python threads
# launching at once break each other's kernels ("Did you forget to add
# @triton.jit?"). Compiled launches on a GPU are thread-safe and stay free.
_INTERPRETER_LOCK = threading.Lock()


def _one_launch_at_a_time():
    return _INTERPRETER_LOCK if interpreter_active() else contextlib.nullcontext()


def _refuse_interpreted_bf16(x: torch.Tensor, y: torch.Tensor) -> None:
    """TypeError for bf16 dot products under the interpreter.

    Triton's interpreter (3.6) gets bf16 ``tl.dot`` wrong: losses of ~1e9
    instead of ~1, silently. A bf16 / fp32 or bf16 / fp16 mix is computed in
    fp32 and is correct there; only two bf16 operands are refused.
    """
    if interpreter_active() and _dot_dtype(x, y) == torch.bfloat16:
        raise TypeError(
            "clipfast triton backend: image_features and text_features are both bfloat16, and "
            "Triton's interpreter (TRITON_INTERPRET=1, how the kernels run without a GPU) "
            "computes bfloat16 dot products wrongly (losses around 1e9). Use backend='chunked' "
            "(or 'auto'), float16 or float32 features, or run on a CUDA GPU.")


# --------------------------------------------------------------------------- #
# What the inputs decide
# --------------------------------------------------------------------------- #


def _dot_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    # Same-dtype half inputs stay on the half-precision tensor-core path; any
    # mix is computed in fp32, which is never less accurate than either input.
    return x.dtype if x.dtype == y.dtype else torch.float32


def _input_precision(dot_dtype: torch.dtype, allow_tf32: bool, interpret: bool) -> str:
    if dot_dtype != torch.float32 or interpret:
        return "ieee"
    return "tf32" if allow_tf32 else "ieee"


def _rows_are_aligned(*features: torch.Tensor) -> bool:
    """Whether Triton sees every feature row 16-byte aligned: base pointers
    multiples of 16 bytes and d and the row strides multiples of 16 elements
    (what its specialisation checks), unit column stride.

    Otherwise the loads cannot be vectorised and keep one address per
    element: the 128-row tiles then spill on sm_80 and sm_90 (d = 100, or rows
    sliced out of a wider tensor; python -m clipfast.aot_check), and
    ``_narrow_for_unaligned`` halves them.
    """
    return all(f.data_ptr() % 16 == 0 and f.shape[1] % 16 == 0 and f.stride(0) % 16 == 0
               and f.stride(1) == 1 for f in features)


def _narrow_for_unaligned(cfg: dict, aligned: bool, *keys: str) -> dict:
    """``cfg`` with the tile sides ``keys`` at most 64 when rows are unaligned."""
    if aligned:
        return cfg
    return dict(cfg, **{key: min(cfg[key], 64) for key in keys})


def _rows_can_be_huge(dot_dtype: torch.dtype) -> bool:
    # fp16 rows stay below 65504 sqrt(d), far from 2^32 (``_huge_row_scales``).
    return dot_dtype != torch.float16


def _guard_huge(dot_dtype: torch.dtype, normalize: bool) -> bool:
    # Unnormalised rows keep inverse norm 1: never "huge" (``_huge_row_scales``).
    return normalize and _rows_can_be_huge(dot_dtype)


def folds_inv_norms(x, y, normalize: bool) -> bool:
    """Whether ``block_grads`` folds the inverse norms into the gradient panel.

    Folding lets both panel products read raw feature rows straight into the
    tensor cores. fp16 panels keep them out: a near-zero row (inv_norm up to
    1e12) would overflow fp16's 65504.
    """
    return normalize and _dot_dtype(x, y) != torch.float16


def panel_scale(x: torch.Tensor, y: torch.Tensor) -> float:
    """The power of two the gradient panel carries (see ``_siglip_grad_kernel``):
    ``siglip_block_grads``' Y accumulator holds this times W^T X^."""
    return 2.0 ** 14 if _dot_dtype(x, y) == torch.float16 else 1.0


def _num_programs_target(device: torch.device, interpret: bool) -> int:
    if _AOT_SM_COUNT is not None:
        return 2 * _AOT_SM_COUNT
    if interpret or device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _kernel_choice(x, y, allow_tf32: bool, config: Callable[[torch.dtype, str, bool], dict]):
    """(dot dtype, input precision, interpret, config) of a tile kernel over x
    and y, where ``config(dot_dtype, precision, interpret)`` picks the tiles;
    refuses what the interpreter would compute wrongly."""
    _refuse_interpreted_bf16(x, y)
    interpret = interpreter_active()
    dot_dtype = _dot_dtype(x, y)
    precision = _input_precision(dot_dtype, allow_tf32, interpret)
    # Decided from the same tensors in the forward and the backward, so both
    # keep one tile grid (bit-identical recomputed logits).
    cfg = _narrow_for_unaligned(config(dot_dtype, precision, interpret), _rows_are_aligned(x, y),
                                "BLOCK_M", "BLOCK_N")
    return dot_dtype, precision, interpret, cfg


# --------------------------------------------------------------------------- #
# Tiles and panels
# --------------------------------------------------------------------------- #

# One default config per dtype class; sizes chosen for H100-class GPUs. The
# interpreter runs tiles as numpy arrays; small tiles keep the multi-tile,
# multi-split and masked-edge paths exercised at the tiny sizes CI can afford.


def _tile_config(dot_dtype: torch.dtype, precision: str, interpret: bool) -> dict:
    """Tiles of the CLIP tile kernels: the forward statistics and, on the same
    grid, the gradient panels."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)
    if dot_dtype == torch.float32 and precision == "ieee":
        # FMA dots hold their operand slices in registers. Larger tiles, more
        # stages or no explicit register budget (ptxas then trades a few spilled
        # bytes for occupancy at 128 registers) spill with some Triton version
        # on sm_80 or sm_90; this is the exact-fp32 option, not the fast one.
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=1, maxnreg=255)
    if dot_dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)
    # 128 x 128 tiles need 255 registers and spill on sm_90 (the accumulator,
    # the logits and the per-element column statistics live at once);
    # 128 x 64 compiles to about 240 without spills (python -m clipfast.aot_check).
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)


def _forward_config(dot_dtype: torch.dtype, precision: str, interpret: bool) -> dict:
    """Tiles of ``_siglip_forward_kernel``."""
    if interpret or (dot_dtype == torch.float32 and precision == "ieee"):
        # The interpreter's small tiles keep multi-tile and edge paths
        # exercised at test sizes; exact fp32 runs FMA dots (see _tile_config).
        return dict(_tile_config(dot_dtype, precision, interpret), GROUP_M=2 if interpret else 8)
    # No statistics live across tiles here (the CLIP forward keeps per-element
    # column state): 128 x 128 tiles fit, 1.5x the CLIP tile's FLOPs per byte
    # of operands, and without normalisation sm_90 needs 128 registers: two
    # CTAs per SM, one's epilogue under the other's MMAs.
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32 if dot_dtype == torch.float32 else 64,
                num_warps=8, num_stages=3, GROUP_M=8)


def _grad_config(dot_dtype: torch.dtype, precision: str, interpret: bool,
                 normalize: bool) -> dict:
    """Tiles of ``_siglip_grad_kernel``."""
    if interpret or (dot_dtype == torch.float32 and precision == "ieee"):
        return _tile_config(dot_dtype, precision, interpret)
    # The forward's BLOCK_K, so each logit sums its products in the same order.
    cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32 if dot_dtype == torch.float32 else 64,
               num_warps=8, num_stages=3)
    if not normalize:
        # About 117 registers without a cap (sm_80 and sm_90): at 128, two
        # CTAs share an SM. Normalised rows (inverse norms, the folded panel,
        # the huge-row guard) need more; capped, they spill.
        cfg["maxnreg"] = 128
    return cfg


def _matmul_config(dot_dtype: torch.dtype, scale_rows: bool, precision: str,
                   interpret: bool) -> dict:
    """Tiles of ``_panel_grads_kernel``; ``scale_rows``: it normalises feature
    rows on load (``folds_inv_norms`` off)."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_D=32, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1)
    if precision == "ieee" and dot_dtype == torch.float32:
        # FMA dots hold operand slices in registers; software pipelining keeps
        # a second set: one stage and an explicit budget stay near 120
        # registers (two stages took 255 and spilled on some versions).
        return dict(BLOCK_M=128, BLOCK_D=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=1,
                    maxnreg=255)
    if dot_dtype == torch.float32 or scale_rows:
        # Rows normalised on load (fp16) pass B through registers: with
        # 128-wide B tiles that spills (python -m clipfast.aot_check).
        return dict(BLOCK_M=128, BLOCK_D=64, BLOCK_K=32 if dot_dtype == torch.float32 else 64,
                    GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_D=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _panel_size(n: int, d: int, panel: Optional[int], cfg: dict, mm_cfg: dict,
                sm_count: Optional[int] = None) -> int:
    """Side of the backward's gradient panels, a multiple of the tile size.

    Panels start on the forward pass's tile grid, so every tile is recomputed
    from the same rows and columns (see _tile_logits). By default a panel
    holds about N*d/8 elements (1/16 of the input gradients' bytes), at least
    2048 so the panel GEMMs fill an H100, at most 8192, and at most about N/2
    so that G never exists as N x N. On a GPU (``sm_count``) the side is then
    moved by up to a quarter so that both panel kernels' programs fill whole
    waves of SMs: 1058 one-per-SM programs take 9 rounds on 132 SMs, 1056
    take 8.
    """
    tile = max(cfg["BLOCK_M"], cfg["BLOCK_N"])
    if panel is not None:
        return max(tile, -(-int(panel) // tile) * tile)
    side = int(math.sqrt(n * d / 8))
    side = min(_MAX_PANEL, max(_MIN_PANEL, side))
    side = min(side, -(-n // 2))
    side = max(tile, -(-side // tile) * tile)
    if not sm_count or side * 2 > n:
        return side

    def wasted(programs: int) -> float:
        return math.ceil(programs / sm_count) / (programs / sm_count)

    def cost(candidate: int) -> float:
        # Rounds per unit of panel area for the recompute kernel (one program
        # per tile) and the product kernel (one per output tile of both sides),
        # weighted alike: their GPU times are about equal.
        # Ceiling divisions: a candidate may be narrower than the product
        # kernel's tile (64-wide panels, 128-row products), which still
        # takes one program per side, not none.
        logits_programs = -(-candidate // cfg["BLOCK_M"]) * -(-candidate // cfg["BLOCK_N"])
        product_programs = 2 * -(-candidate // mm_cfg["BLOCK_M"]) * -(-d // mm_cfg["BLOCK_D"])
        return wasted(logits_programs) + wasted(product_programs)

    lo, hi = max(tile, (3 * side // 4) // tile * tile), min(-(-n // 2), 5 * side // 4)
    candidates = range(lo, max(lo, hi) + 1, tile)
    return min(candidates, key=lambda c: (round(cost(c), 3), abs(c - side)))


@dataclass(frozen=True)
class PanelPlan:
    """How a backward pass covers an M x K block with gradient panels."""

    side: int                   # panel side, a multiple of the tile size
    cfg: dict                   # the G-panel kernel's tiles and options
    mm_cfg: dict                # the panel products' (``_panel_grads_kernel``)
    dot_dtype: torch.dtype
    precision: str
    fold: bool                  # ``folds_inv_norms``
    partials: Tuple[int, int]   # (row tiles of the block, column tiles of a panel)


def _panel_plan(x, y, normalize: bool, allow_tf32: bool, panel: Optional[int],
                grad_config: Callable[[torch.dtype, str, bool], dict]) -> PanelPlan:
    """The panels of an M x K block's backward, with ``grad_config(dot_dtype,
    precision, interpret)`` choosing the gradient-panel kernel's tiles."""
    m, d = x.shape
    k = y.shape[0]
    dot_dtype, precision, interpret, cfg = _kernel_choice(x, y, allow_tf32, grad_config)
    fold = folds_inv_norms(x, y, normalize)
    mm_cfg = _narrow_for_unaligned(
        _matmul_config(dot_dtype, normalize and not fold, precision, interpret),
        _rows_are_aligned(x, y), "BLOCK_D")
    sm_count = _num_programs_target(x.device, interpret) // 2 if not interpret else None
    side = _panel_size(max(m, k), d, panel, cfg, mm_cfg, sm_count)
    partials = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(min(side, k), cfg["BLOCK_N"]))
    return PanelPlan(side, cfg, mm_cfg, dot_dtype, precision, fold, partials)


def siglip_panel_plan(x, y, normalize: bool, allow_tf32: bool, panel: Optional[int]) -> PanelPlan:
    """The panels of ``siglip_block_grads``: the CLIP backward's side
    (``_panel_size``), extra memory of one side x side panel in the dot dtype
    and a side x d fp32 buffer for dX^."""
    return _panel_plan(x, y, normalize, allow_tf32, panel,
                       functools.partial(_grad_config, normalize=normalize))


# --------------------------------------------------------------------------- #
# Forward launchers
# --------------------------------------------------------------------------- #


def inverse_norms(features, normalize: bool) -> torch.Tensor:
    """fp32 1 / max(|row|, eps) (ones when normalize is False)."""
    n, d = features.shape
    inv = torch.empty(n, dtype=torch.float32, device=features.device)
    block_r = 16 if interpreter_active() else 32
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    with _one_launch_at_a_time():
        _inverse_norms_kernel[(triton.cdiv(n, block_r),)](
            features, inv, n, d, features.stride(0), features.stride(1),
            NORMALIZE=normalize, EPS=_NORM_EPS, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return inv


def block_stats(x, y, inv_x, inv_y, scale, bias, diag_offset: Optional[int], with_cols: bool,
                allow_tf32: bool):
    """Statistics of the M x K block of logits s * X^ Y^T (+ b), from one sweep.

    Returns fp32 (row_max, row_sum, col_max, col_sum, diag): per row and per
    column the max and sum(exp(L - max)) (col_* None without ``with_cols``),
    and the label logits L[i, i + diag_offset] (None when diag_offset is None).
    ``scale`` and ``bias`` are 1-element fp32 tensors (bias may be None).
    """
    m, d = x.shape
    k = y.shape[0]
    dot_dtype, precision, interpret, cfg = _kernel_choice(x, y, allow_tf32, _tile_config)
    num_row_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    num_col_blocks = triton.cdiv(k, cfg["BLOCK_N"])
    side = max(1, int(_num_programs_target(x.device, interpret) ** 0.5))
    row_splits = min(num_row_blocks, side)
    col_splits = min(num_col_blocks, side)
    row_blocks_per_split = triton.cdiv(num_row_blocks, row_splits)
    col_blocks_per_split = triton.cdiv(num_col_blocks, col_splits)
    row_splits = triton.cdiv(num_row_blocks, row_blocks_per_split)
    col_splits = triton.cdiv(num_col_blocks, col_blocks_per_split)

    f32 = dict(dtype=torch.float32, device=x.device)
    row_max_part = torch.empty(col_splits, m, **f32)
    row_sum_part = torch.empty_like(row_max_part)
    diag = torch.empty(m, **f32) if diag_offset is not None else None
    # Every slot is written by its program: no initialisation.
    col_max_part = torch.empty(row_splits, k, **f32) if with_cols else row_max_part
    col_sum_part = torch.empty(row_splits, k, **f32) if with_cols else row_sum_part
    with _one_launch_at_a_time():
        _forward_tiles_kernel[(row_splits, col_splits)](
            x, y, inv_x, inv_y, scale, bias if bias is not None else scale,
            row_max_part, row_sum_part, col_max_part, col_sum_part,
            diag if diag is not None else row_max_part,
            m, k, d, diag_offset or 0, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            row_blocks_per_split, col_blocks_per_split,
            HAS_BIAS=bias is not None, HAS_DIAG=diag_offset is not None, WITH_COLS=with_cols,
            GUARD_HUGE=_rows_can_be_huge(dot_dtype),
            DOT_DTYPE=_TORCH_TO_TL[dot_dtype], INPUT_PRECISION=precision,
            enable_fp_fusion=_LOGIT_FUSION,
            **cfg,
        )
    row_max, row_sum = merge_partial_sums(row_max_part, row_sum_part)
    col_max = col_sum = None
    if with_cols:
        col_max, col_sum = merge_partial_sums(col_max_part, col_sum_part)
    return row_max, row_sum, col_max, col_sum, diag


def siglip_block_sum(x, y, inv_x, inv_y, scale, bias, positives: bool, *, normalize: bool,
                     allow_tf32: bool) -> torch.Tensor:
    """fp64 0-dim sum of softplus(-z L) over the M x K block, z = +1 on (i, i)
    with ``positives``. ``scale`` / ``bias`` are 1-element fp32 tensors (bias
    may be None); without ``normalize`` the inverse norms are not read."""
    m, d = x.shape
    k = y.shape[0]
    dot_dtype, precision, interpret, cfg = _kernel_choice(x, y, allow_tf32, _forward_config)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"])
    programs = max(1, min(tiles, _num_programs_target(x.device, interpret)))
    partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    with _one_launch_at_a_time():
        _siglip_forward_kernel[(programs,)](
            x, y, inv_x, inv_y, scale, bias if bias is not None else scale, partials,
            m, k, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, POSITIVES=positives, NORMALIZE=normalize,
            GUARD_HUGE=_guard_huge(dot_dtype, normalize),
            DOT_DTYPE=_TORCH_TO_TL[dot_dtype], INPUT_PRECISION=precision,
            enable_fp_fusion=_LOGIT_FUSION,
            **cfg,
        )
    return partials.sum(dtype=torch.float64)


# --------------------------------------------------------------------------- #
# Backward launchers
# --------------------------------------------------------------------------- #


def launch_panel_products(grad_panel, rows, cols, row_start, col_start, gx_row0, x, inv_x, y,
                          inv_y, gx, gy, gy_lo, inv_range, need_x, need_y, *, split_acc_y,
                          scale_rows, unshift, dot_dtype, precision, mm_cfg):
    """dX^ += G Y^ and dY^ += G^T X^ for one rows x cols panel of G, in one
    launch (``_panel_grads_kernel``): the second launch per panel of
    ``_run_panels``, whichever loss wrote G."""
    tiles_d = triton.cdiv(x.shape[1], mm_cfg["BLOCK_D"])
    x_tiles = triton.cdiv(rows, mm_cfg["BLOCK_M"]) * tiles_d if need_x else 0
    y_tiles = triton.cdiv(cols, mm_cfg["BLOCK_M"]) * tiles_d if need_y else 0
    with _one_launch_at_a_time():
        _panel_grads_kernel[(x_tiles + y_tiles,)](
            grad_panel, grad_panel.stride(0), grad_panel.stride(1), rows, cols, x.shape[1],
            row_start, col_start, gx_row0,
            x, x.stride(0), x.stride(1), inv_x,
            y, y.stride(0), y.stride(1), inv_y,
            gx, gx.stride(0), gx.stride(1),
            gy, gy_lo, gy.stride(0), gy.stride(1),
            inv_range, x_tiles, WITH_X=need_x, WITH_Y=need_y,
            SCALE_ROWS=scale_rows, SPLIT_ACC_Y=split_acc_y,
            UNSHIFT=unshift,
            DOT_DTYPE=_TORCH_TO_TL[dot_dtype], INPUT_PRECISION=precision,
            **mm_cfg,
        )


def _run_panels(x, y, inv_x, inv_y, plan: PanelPlan, parts, launch_grad_panel, *,
                normalize: bool, x_out=None, x_factor=None, x_acc=None, y_acc=None,
                y_acc_lo=None) -> None:
    """The panel loop of both backwards over an M x K block.

    Per plan.side x plan.side panel, ``launch_grad_panel(grad_panel,
    inv_range, row_start, col_start, rows, cols)`` writes G into
    ``grad_panel`` (and its partial sums into ``parts``), then one launch of
    ``_panel_grads_kernel`` accumulates both products. The accumulators are
    as ``block_grads`` describes; ``x_out`` is finished row panel by row
    panel. ``parts`` also stands in for pointer arguments a specialisation
    never reads.
    """
    m, d = x.shape
    k = y.shape[0]
    side = plan.side
    device = x.device
    need_x = x_out is not None or x_acc is not None
    need_y = y_acc is not None

    panel_acc = None
    if x_out is not None:
        panel_acc = torch.empty(min(side, m), d, dtype=torch.float32, device=device)
    grad_panel = torch.empty(min(side, m), min(side, k), dtype=plan.dot_dtype, device=device)
    gx, gx_is_panel = (panel_acc, True) if panel_acc is not None else (
        (x_acc, False) if x_acc is not None else (parts, True))
    gy = y_acc if need_y else parts
    gy_lo = y_acc_lo if y_acc_lo is not None else gy
    # (max inv_x, max inv_y, min inv_x, min inv_y) for _fold_shifts: three
    # small launches per call, none per panel, no host synchronisation.
    inv_range = parts
    if plan.fold:
        (x_lo, x_hi), (y_lo, y_hi) = torch.aminmax(inv_x), torch.aminmax(inv_y)
        inv_range = torch.stack((x_hi, y_hi, x_lo, y_lo))

    # The loop body is two launches and no tensor operations: every offset
    # travels as a kernel argument, so the host keeps ahead of the GPU.
    for row_start in range(0, m, side):
        rows = min(side, m - row_start)
        if panel_acc is not None:
            panel_acc.zero_()
        for col_start in range(0, k, side):
            cols = min(side, k - col_start)
            launch_grad_panel(grad_panel, inv_range, row_start, col_start, rows, cols)
            if not (need_x or need_y):
                continue
            launch_panel_products(
                grad_panel, rows, cols, row_start, col_start, 0 if gx_is_panel else row_start,
                x, inv_x, y, inv_y, gx, gy, gy_lo, inv_range, need_x, need_y,
                split_acc_y=y_acc_lo is not None, scale_rows=normalize and not plan.fold,
                unshift=plan.fold, dot_dtype=plan.dot_dtype, precision=plan.precision,
                mm_cfg=plan.mm_cfg)
        if x_out is not None:
            finish_feature_grad(
                panel_acc, x[row_start:row_start + rows], inv_x[row_start:row_start + rows],
                x_factor, normalize, plan.fold, x_out[row_start:row_start + rows])


def block_grads(x, y, inv_x, inv_y, scale, bias, row_stats, col_stats, diag_offset: Optional[int],
                *, normalize: bool, allow_tf32: bool, panel: Optional[int],
                x_out=None, x_factor=None, x_acc=None, y_acc=None, y_acc_lo=None):
    """Accumulate the gradients of an M x K block, G = (P - I) + (Q - I).

    ``row_stats`` / ``col_stats`` are complete (max, log-sum) pairs, or None to
    leave that term out. On the X side either ``x_out`` (finished per row panel
    with ``x_factor``, in x's dtype) or ``x_acc`` (an fp32 M x d running sum of
    G @ Y^); on the Y side ``y_acc`` (fp32 K x d, or the int16 high plane with
    ``y_acc_lo``) += G^T @ X^. With ``folds_inv_norms`` the running sums carry
    the inverse norms (inv_x_i G Y^ rather than G Y^). Returns the fp32 0-dim
    sum of G * cosine, the scale gradient before its factor.
    """
    m, d = x.shape
    k = y.shape[0]
    # Panels start on the forward's tile grid (see _panel_size).
    plan = _panel_plan(x, y, normalize, allow_tf32, panel, _tile_config)
    cfg = plan.cfg
    scale_grad_part = torch.empty(plan.partials, dtype=torch.float32, device=x.device)
    unused = scale_grad_part  # pointer arguments a specialisation never reads
    row_max, row_logsum = row_stats if row_stats is not None else (unused, unused)
    col_max, col_logsum = col_stats if col_stats is not None else (unused, unused)
    bias_arg = bias if bias is not None else scale

    def launch_grad_logits(grad_panel, inv_range, row_start, col_start, rows, cols):
        with _one_launch_at_a_time():
            _grad_logits_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_N"]))](
                x, y, inv_x, inv_y, scale, bias_arg,
                row_max, row_logsum, col_max, col_logsum, grad_panel, scale_grad_part,
                inv_range,
                m, k, d, diag_offset or 0, row_start, col_start, rows, cols, plan.partials[1],
                x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                grad_panel.stride(0), grad_panel.stride(1),
                HAS_BIAS=bias is not None, HAS_DIAG=diag_offset is not None,
                USE_ROWS=row_stats is not None, USE_COLS=col_stats is not None,
                FOLD_INV_NORMS=plan.fold, GUARD_HUGE=_rows_can_be_huge(plan.dot_dtype),
                DOT_DTYPE=_TORCH_TO_TL[plan.dot_dtype], INPUT_PRECISION=plan.precision,
                enable_fp_fusion=_LOGIT_FUSION,
                **cfg,
            )

    _run_panels(x, y, inv_x, inv_y, plan, scale_grad_part, launch_grad_logits,
                normalize=normalize, x_out=x_out, x_factor=x_factor, x_acc=x_acc, y_acc=y_acc,
                y_acc_lo=y_acc_lo)
    return scale_grad_part.sum()


def siglip_block_grads(x, y, inv_x, inv_y, scale, bias, positives: bool, *, normalize: bool,
                       allow_tf32: bool, panel: Optional[int], x_out=None, x_factor=None,
                       y_acc=None, y_acc_lo=None):
    """Accumulate the gradients of the M x K block's softplus sum.

    X side: ``x_out`` (finished per row panel with ``x_factor``, in x's
    dtype) or nothing; Y side: ``y_acc`` (fp32 K x d, or the int16 high plane
    with ``y_acc_lo``) += ``panel_scale`` x W^T @ X^, carrying the inverse
    norms when ``folds_inv_norms``. Returns fp64 0-dim (sum W * cosine,
    sum W): the scale and bias gradients before their factor.
    """
    m, d = x.shape
    k = y.shape[0]
    plan = siglip_panel_plan(x, y, normalize, allow_tf32, panel)
    cfg = plan.cfg
    guard = _guard_huge(plan.dot_dtype, normalize)
    parts = torch.empty(2, *plan.partials, dtype=torch.float32, device=x.device)
    scale_part, bias_part = parts.unbind(0)  # views made once, not per launch
    bias_arg = bias if bias is not None else scale
    if x_out is not None and panel_scale(x, y) != 1.0:
        x_factor = x_factor / panel_scale(x, y)  # exact: a power of two

    def launch_siglip_grad(grad_panel, inv_range, row_start, col_start, rows, cols):
        with _one_launch_at_a_time():
            _siglip_grad_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_N"]))](
                x, y, inv_x, inv_y, scale, bias_arg, grad_panel, scale_part, bias_part, inv_range,
                m, k, d, row_start, col_start, rows, cols, plan.partials[1],
                x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                grad_panel.stride(0), grad_panel.stride(1),
                HAS_BIAS=bias is not None, POSITIVES=positives, NORMALIZE=normalize,
                FOLD_INV_NORMS=plan.fold, PANEL_SCALE=panel_scale(x, y), GUARD_HUGE=guard,
                DOT_DTYPE=_TORCH_TO_TL[plan.dot_dtype], INPUT_PRECISION=plan.precision,
                enable_fp_fusion=_LOGIT_FUSION,
                **cfg,
            )

    _run_panels(x, y, inv_x, inv_y, plan, parts, launch_siglip_grad, normalize=normalize,
                x_out=x_out, x_factor=x_factor, y_acc=y_acc, y_acc_lo=y_acc_lo)
    sums = parts.sum(dim=(1, 2), dtype=torch.float64)
    return sums[0], sums[1]


def finish_feature_grad(acc, features, inv_norm, factor, normalize, folded, out, acc_lo=None):
    """out = normalize_backward(factor * acc) (see _finish_grad_kernel).

    ``acc`` is an fp32 (M, d) buffer, or with ``acc_lo`` the int16 high plane
    of a split accumulator; ``factor`` is a 1-element fp32 tensor; ``folded``
    says the accumulator carries the inverse norms (see ``block_grads``).
    """
    m, d = features.shape
    block_r = 16 if interpreter_active() else 8
    block_d = min(256, max(16, triton.next_power_of_2(d)))
    with _one_launch_at_a_time():
        _finish_grad_kernel[(triton.cdiv(m, block_r),)](
            acc, acc if acc_lo is None else acc_lo, acc.stride(0), acc.stride(1),
            features, features.stride(0), features.stride(1), inv_norm,
            out, out.stride(0), out.stride(1), factor,
            m, d,
            NORMALIZE=normalize, TIMES_INV_NORM=normalize and not folded,
            SPLIT_ACC=acc_lo is not None, EPS=_NORM_EPS,
            RTNE_BF16=interpreter_active() and out.dtype == torch.bfloat16,
            BLOCK_R=block_r, BLOCK_D=block_d,
        )


# --------------------------------------------------------------------------- #
# What the autograd layers (clip_loss.py, siglip.py) share
# --------------------------------------------------------------------------- #


def fp32_scalars(scale, bias):
    """Scale and bias as the launchers take them: 1-element fp32 tensors
    (bias may be None), detached."""
    scale_f32 = scale.detach().reshape(1).float().contiguous()
    bias_f32 = bias.detach().reshape(1).float().contiguous() if bias is not None else None
    return scale_f32, bias_f32


def _half_precision_accumulator(like: torch.Tensor):
    """Zeroed gradient for ``like`` and the accumulator views that build it.

    fp32: the gradient itself. fp16/bf16: a 24-bit float split over the 16-bit
    gradient (int16 view) and a byte plane: 1.25x the gradient's bytes instead
    of 3x for a separate fp32 buffer.
    """
    grad = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    if like.dtype == torch.float32:
        return grad, grad, None
    return grad, grad.view(torch.int16), torch.zeros(like.shape, dtype=torch.uint8, device=like.device)


def feature_grads(x, y, inv_y, factor, need_x: bool, need_y: bool, normalize: bool,
                  accumulate, y_unscale: Optional[float] = None):
    """(grad_x, grad_y, accumulate's result) for a loss whose feature
    gradients are ``factor`` times one block's panel products.

    ``accumulate(x_out=, x_factor=, y_acc=, y_acc_lo=)`` is ``block_grads``
    or ``siglip_block_grads`` with the block bound: it finishes grad_x row
    panel by row panel and accumulates dY^ in place (for fp16/bf16 over the
    gradient itself and a byte plane), which is finished here, with
    ``factor / y_unscale`` when the accumulator holds a multiple of dY^.
    """
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    grad_y = y_acc = y_acc_lo = None
    if need_y:
        grad_y, y_acc, y_acc_lo = _half_precision_accumulator(y)
    result = accumulate(x_out=grad_x, x_factor=factor, y_acc=y_acc, y_acc_lo=y_acc_lo)
    if need_y:
        y_factor = factor if y_unscale is None else factor / y_unscale
        finish_feature_grad(y_acc, y, inv_y, y_factor, normalize,
                            folds_inv_norms(x, y, normalize), grad_y, acc_lo=y_acc_lo)
    return grad_x, grad_y, result
