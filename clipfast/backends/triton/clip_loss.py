"""Fused CLIP loss in Triton: kernels, then launchers, then the custom operator.

Forward (one pass over the N x N tiles, 2*N^2*d FLOPs):
  * ``_inverse_norms_kernel``: inverse L2 norms of the feature rows.
  * ``_forward_tiles_kernel``: the grid is a ROW_SPLITS x COL_SPLITS grid of
    "super-tiles"; each program sweeps its super-tile column block by column
    block in BLOCK_M x BLOCK_N tiles computed on-chip (fp32 accumulation,
    norms and scale applied in the epilogue). Row statistics merge per tile
    into the program's slot of a (COL_SPLITS, N) buffer; column statistics
    are kept per tile element in registers and reduced once per column block
    into the program's slot of a (ROW_SPLITS, N) buffer. Both use an online
    (running max, running sum) log-sum-exp, so nothing underflows whatever
    the scale. The per-split
    partials are merged afterwards (O(splits * N)) and kept as (max, log-sum)
    pairs rather than one rounded LSE: see ``chunked.clip_loss_from_stats``.
    The diagonal logits are read off the same tiles.

Backward (recomputation from the saved LSEs):
  * ``_grad_logits_kernel`` recomputes one panel of logits and writes the
    unscaled gradient weights P + Q - 2*I (values in [-2, 2], so fp16/bf16
    panels neither overflow nor flush) and accumulates per-tile partial sums
    for the scale gradient on the device. A panel is at most PANEL x PANEL (8192^2 by default) and
    never the whole N x N matrix.
  * ``_panel_grads_kernel`` accumulates dX^ += G @ Y^ and dY^ += G^T @ X^
    in one launch. The panel carries the inverse norms (G_ij inv_x_i inv_y_j),
    so both products read the raw feature rows and no normalised copy is ever
    stored; the 1/|x| of the normalisation backward cancels against them.
    (fp16 panels instead normalise feature rows on load: see ``fold``.) dX^ of the current row panel lives in
    a PANEL x d fp32 buffer; dY^ lives in the gradient output itself (fp32), or
    for fp16/bf16 as a 24-bit float split over the 16-bit output and a byte
    plane, which keeps accumulation error far below the final rounding.
  * ``_finish_grad_kernel`` applies the normalisation backward and the
    s * grad_out / (2N) factor in place, without N x d temporaries.

Extra memory beyond the two gradients: O(N) statistics, one G panel (about
N*d/4 elements, at most 8192^2), a PANEL x d fp32 buffer and, for fp16/bf16
text features, an N x d byte plane.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from .._ops import (DISTRIBUTED_DOUBLE_BACKWARD, KernelOptions, define_clip_loss_op,
                    exact_zero_bias_grad, pack_stats, refuse_double_backward, without_autocast)
from ._runtime import interpreter_requested as interpreter_active
from .._stats import clip_loss_from_stats, extra_logits_grad, merge_extra_logits, with_bias

_NORM_EPS = 1e-12
_TORCH_TO_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}


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
# Kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _inverse_norms_kernel(
    x_ptr, inv_ptr, N, D, stride_xn, stride_xd,
    NORMALIZE: tl.constexpr, EPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = offs_r < N
    if NORMALIZE:
        sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            offs_d = k0 + tl.arange(0, BLOCK_D)
            mask = mask_r[:, None] & (offs_d[None, :] < D)
            x = tl.load(x_ptr + offs_r[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                        mask=mask, other=0.0).to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        inv = 1.0 / tl.maximum(tl.sqrt(sq), EPS)
        overflowed = sq > 3.0e38  # inf; NaN rows stay NaN either way
        if tl.max(overflowed.to(tl.int32), axis=0) > 0:
            # Rows from ~1.8e19 on square past fp32: again, on the rows divided
            # by a power of two near their largest entry (exact). Underflow
            # needs no such pass: rows whose squares underflow are below eps.
            top = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_D):
                offs_d = k0 + tl.arange(0, BLOCK_D)
                mask = mask_r[:, None] & (offs_d[None, :] < D)
                x = tl.load(x_ptr + offs_r[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                            mask=mask, other=0.0).to(tl.float32)
                top = tl.maximum(top, tl.max(tl.abs(x), axis=1))
            exponent = (top.to(tl.int32, bitcast=True) >> 23) & 0xFF
            pow2 = (tl.maximum(exponent, 1) << 23).to(tl.float32, bitcast=True)
            sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_D):
                offs_d = k0 + tl.arange(0, BLOCK_D)
                mask = mask_r[:, None] & (offs_d[None, :] < D)
                x = tl.load(x_ptr + offs_r[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                            mask=mask, other=0.0).to(tl.float32) / pow2[:, None]
                sq += tl.sum(x * x, axis=1)
            # 1 / max(|x|, eps) = (1 / max(|x| / pow2, eps / pow2)) / pow2.
            scaled = (1.0 / tl.maximum(tl.sqrt(sq), EPS / pow2)) / pow2
            inv = tl.where(overflowed, scaled, inv)
    else:
        inv = tl.full((BLOCK_R,), 1.0, tl.float32)
    tl.store(inv_ptr + offs_r, inv, mask=mask_r)


@triton.jit
def _similarity_tile(
    x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D,
    stride_xn, stride_xd, stride_yn, stride_yd, scale_x, scale_y,
    SCALED: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Dot products <x_i, y_j> of a BLOCK_M x BLOCK_N tile, fp32 accumulated;
    SCALED: of the rows times scale_x / scale_y (powers of two, see
    ``_huge_row_scales``)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xn
    y_rows = y_ptr + offs_n[None, :] * stride_yn
    if SCALED:
        # Rare (huge rows only): unpipelined, so that its registers do not
        # add to the common loop's.
        for k0 in tl.range(0, D, BLOCK_K, num_stages=1):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D
            x = tl.load(x_rows + offs_k[None, :] * stride_xd,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            y_t = tl.load(y_rows + offs_k[:, None] * stride_yd,
                          mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            # Powers of two: exact in the dot dtype itself (bf16 keeps fp32's
            # exponent range), and no fp32 copy of the operands.
            x = x.to(DOT_DTYPE) * scale_x[:, None].to(DOT_DTYPE)
            y_t = y_t.to(DOT_DTYPE) * scale_y[None, :].to(DOT_DTYPE)
            acc = tl.dot(x, y_t, acc, input_precision=INPUT_PRECISION)
    else:
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D
            x = tl.load(x_rows + offs_k[None, :] * stride_xd,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            # Y is read as a (BLOCK_K, BLOCK_N) transposed view: no tl.trans needed.
            y_t = tl.load(y_rows + offs_k[:, None] * stride_yd,
                          mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(x.to(DOT_DTYPE), y_t.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _huge_row_scales(inv, huge):
    """(scale, inverse norm the dot products see) for one side of a tile.

    Rows of norm past 2^32 (inverse norm below 2^-32) are huge: two of them
    can overflow the fp32 dot product (|x| |y| > 3.4e38, from ~1.8e19 each).
    Such a row is read times scale, the power of two with inv / scale in
    [1, 2) (its norm is then about 1), and its cosines take inv / scale:
    exact, so the logits are those of the raw rows wherever those stay in
    range. Other rows keep scale 1 and their own inverse norm.
    """
    exponent = tl.maximum((inv.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1)
    scale = tl.where(huge, (exponent << 23).to(tl.float32, bitcast=True), 1.0)
    inverse = ((254 - exponent) << 23).to(tl.float32, bitcast=True)  # 1 / scale
    return scale, tl.where(huge, inv * inverse, inv)


@triton.jit
def _tile_dots(
    x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y,
    stride_xn, stride_xd, stride_yn, stride_yd,
    GUARD_HUGE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(dot products, inv_x, inv_y for ``_logits_from_dots``) of one tile.

    A tile holding a huge row (GUARD_HUGE: not for fp16 operands, whose rows
    stay below 65504 sqrt(d)) reads its rows scaled (``_huge_row_scales``);
    every other tile runs the plain, pipelined product. Forward and backward
    decide alike for a tile, so recomputed logits still match bit for bit.
    (The scaled branch costs the forward kernel up to ~10 registers: up to
    255 on sm_80, no spills with Triton 3.6 / 3.7.1 / 3.9; python -m
    clipfast.aot_check.)
    """
    if GUARD_HUGE:
        huge_x = mask_m & (inv_x < 2.0 ** -32)
        huge_y = mask_n & (inv_y < 2.0 ** -32)
        if tl.max(huge_x.to(tl.int32), axis=0) + tl.max(huge_y.to(tl.int32), axis=0) > 0:
            scale_x, inv_x = _huge_row_scales(inv_x, huge_x)
            scale_y, inv_y = _huge_row_scales(inv_y, huge_y)
            acc = _similarity_tile(
                x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D,
                stride_xn, stride_xd, stride_yn, stride_yd, scale_x, scale_y,
                True, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )
        else:
            acc = _similarity_tile(
                x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D,
                stride_xn, stride_xd, stride_yn, stride_yd, inv_x, inv_y,
                False, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )
    else:
        acc = _similarity_tile(
            x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D,
            stride_xn, stride_xd, stride_yn, stride_yd, inv_x, inv_y,
            False, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
    return acc, inv_x, inv_y


@triton.jit
def _logits_from_dots(acc, inv_x, inv_y, scale, bias_ptr, HAS_BIAS: tl.constexpr):
    """(cosines, logits) of a tile of raw dot products.

    Forward and backward both go through here, on the same tile grid, so the
    backward pass recomputes bit-identical logits: where |L| is large and the
    softmax one-hot, an ulp of difference against the saved max would show up
    as a spurious gradient.
    """
    cosine = acc * inv_x[:, None] * inv_y[None, :]
    logits = cosine * scale
    if HAS_BIAS:
        logits += tl.load(bias_ptr).to(tl.float32)
    return cosine, logits


@triton.jit
def _forward_tiles_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr,
    row_max_part_ptr, row_sum_part_ptr, col_max_part_ptr, col_sum_part_ptr, diag_ptr,
    M, K, D, diag_offset,
    stride_xn, stride_xd, stride_yn, stride_yd,
    row_blocks_per_split, col_blocks_per_split,
    HAS_BIAS: tl.constexpr, HAS_DIAG: tl.constexpr, WITH_COLS: tl.constexpr,
    GUARD_HUGE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Statistics of an M x K block of logits (rows from X, columns from Y).

    The label of row i is column i + diag_offset (HAS_DIAG); WITH_COLS also
    gathers column statistics. The square loss is M = K, diag_offset = 0.

    Each program sweeps its super-tile column block by column block, and
    within one, row block by row block. Row statistics are cheap to reduce
    per tile (a row's values sit in one warp) and merge into the program's
    slot of the row partials. Column statistics are not reduced per tile
    (a column spans every warp: a shared-memory pass): each tile element
    keeps its own running (max, sum) in registers, updated with one
    exponential, and they are reduced once per column block.
    """
    row_split = tl.program_id(0)
    col_split = tl.program_id(1)
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    num_col_blocks = tl.cdiv(K, BLOCK_N)
    rb_start = row_split * row_blocks_per_split
    rb_stop = tl.minimum(rb_start + row_blocks_per_split, num_row_blocks)
    cb_start = col_split * col_blocks_per_split
    cb_stop = tl.minimum(cb_start + col_blocks_per_split, num_col_blocks)

    scale = tl.load(scale_ptr).to(tl.float32)
    col_part_base = row_split.to(tl.int64) * K
    row_part_base = col_split.to(tl.int64) * M

    for cb in range(cb_start, cb_stop):
        offs_n = (cb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < K
        inv_y = tl.load(inv_y_ptr + offs_n, mask=mask_n, other=0.0)
        if WITH_COLS:
            # A finite floor, not -inf: (L - max) stays a number for masked
            # (-inf) logits, and exp(floor - real max) is 0.
            elem_max = tl.full((BLOCK_M, BLOCK_N), -3.0e38, tl.float32)
            elem_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for rb in range(rb_start, rb_stop):
            offs_m = (rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            mask_m = offs_m < M
            inv_x = tl.load(inv_x_ptr + offs_m, mask=mask_m, other=0.0)
            acc, tile_inv_x, tile_inv_y = _tile_dots(
                x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y,
                stride_xn, stride_xd, stride_yn, stride_yd,
                GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )
            _, logits = _logits_from_dots(acc, tile_inv_x, tile_inv_y, scale, bias_ptr, HAS_BIAS)
            if ((rb + 1) * BLOCK_M > M) | ((cb + 1) * BLOCK_N > K):
                # Only edge tiles pay for the mask.
                logits = tl.where(mask_m[:, None] & mask_n[None, :], logits, float("-inf"))
            if HAS_DIAG:
                label_lo = rb * BLOCK_M + diag_offset
                if (label_lo < (cb + 1) * BLOCK_N) & (cb * BLOCK_N < label_lo + BLOCK_M):
                    # The label logit is taken from the very tile the statistics
                    # see, so max - L_ii is exact where the pair wins its row.
                    labels = offs_m + diag_offset
                    on_diag = labels[:, None] == offs_n[None, :]
                    diag = tl.sum(tl.where(on_diag, logits, 0.0), axis=1)
                    in_tile = (mask_m & (labels >= cb * BLOCK_N) & (labels < (cb + 1) * BLOCK_N)
                               & (labels < K))
                    tl.store(diag_ptr + offs_m, diag, mask=in_tile)

            # Row statistics: this tile's online log-sum-exp merged into the
            # program's own slot (nothing to read on its first column block).
            row_ptrs = row_part_base + offs_m
            first = cb == cb_start
            row_max = tl.load(row_max_part_ptr + row_ptrs, mask=mask_m & (not first),
                              other=float("-inf"))
            row_sum = tl.load(row_sum_part_ptr + row_ptrs, mask=mask_m & (not first), other=0.0)
            new_row_max = tl.maximum(row_max, tl.max(logits, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_row_max) + tl.sum(
                tl.exp(logits - new_row_max[:, None]), axis=1)
            tl.store(row_max_part_ptr + row_ptrs, new_row_max, mask=mask_m)
            tl.store(row_sum_part_ptr + row_ptrs, row_sum, mask=mask_m)

            if WITH_COLS:
                # Per element: e = exp(-|L - max|) serves both cases of the
                # online update (a new max rescales the old sum by e).
                delta = logits - elem_max
                e = tl.exp(-tl.abs(delta))
                elem_sum = tl.where(delta > 0, elem_sum * e + 1.0, elem_sum + e)
                elem_max = tl.maximum(elem_max, logits)
        if WITH_COLS:
            col_max = tl.max(elem_max, axis=0)
            col_sum = tl.sum(elem_sum * tl.exp(elem_max - col_max[None, :]), axis=0)
            col_ptrs = col_part_base + offs_n
            tl.store(col_max_part_ptr + col_ptrs, col_max, mask=mask_n)
            tl.store(col_sum_part_ptr + col_ptrs, col_sum, mask=mask_n)


@triton.jit
def _grad_logits_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr,
    row_max_ptr, row_logsum_ptr, col_max_ptr, col_logsum_ptr, grad_panel_ptr, scale_grad_part_ptr,
    inv_range_ptr,
    M, K, D, diag_offset, row_start, col_start, panel_rows, panel_cols, scale_part_pitch,
    stride_xn, stride_xd, stride_yn, stride_yd,
    stride_gm, stride_gn,
    HAS_BIAS: tl.constexpr, HAS_DIAG: tl.constexpr, USE_ROWS: tl.constexpr,
    USE_COLS: tl.constexpr, FOLD_INV_NORMS: tl.constexpr,
    GUARD_HUGE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of the gradient panel: (P - I) [USE_ROWS] + (Q - I) [USE_COLS],
    I marking column i + diag_offset of row i (HAS_DIAG); times inv_x_i * inv_y_j
    * 2^shift with FOLD_INV_NORMS (``_fold_shifts``), so the panel products can
    take raw feature rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (row_start + local_m).to(tl.int64)
    offs_n = (col_start + local_n).to(tl.int64)
    mask_m = (local_m < panel_rows) & (offs_m < M)
    mask_n = (local_n < panel_cols) & (offs_n < K)

    scale = tl.load(scale_ptr).to(tl.float32)
    inv_x = tl.load(inv_x_ptr + offs_m, mask=mask_m, other=0.0)
    inv_y = tl.load(inv_y_ptr + offs_n, mask=mask_n, other=0.0)
    acc, tile_inv_x, tile_inv_y = _tile_dots(
        x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y,
        stride_xn, stride_xd, stride_yn, stride_yd,
        GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    cosine, logits = _logits_from_dots(acc, tile_inv_x, tile_inv_y, scale, bias_ptr, HAS_BIAS)
    # (L - max) first: exact near the max, as in PyTorch's softmax. On the
    # labels (P - 1) + (Q - 1): each difference is exact, whereas P + Q - 2
    # would round P + Q at ulp(2) first.
    if HAS_DIAG:
        on_diag = (offs_m + diag_offset)[:, None] == offs_n[None, :]
    grad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_ROWS:
        row_max = tl.load(row_max_ptr + offs_m, mask=mask_m, other=0.0)
        row_logsum = tl.load(row_logsum_ptr + offs_m, mask=mask_m, other=0.0)
        prob_row = tl.exp((logits - row_max[:, None]) - row_logsum[:, None])
        if HAS_DIAG:
            prob_row = tl.where(on_diag, prob_row - 1.0, prob_row)
        grad += prob_row
    if USE_COLS:
        col_max = tl.load(col_max_ptr + offs_n, mask=mask_n, other=0.0)
        col_logsum = tl.load(col_logsum_ptr + offs_n, mask=mask_n, other=0.0)
        prob_col = tl.exp((logits - col_max[None, :]) - col_logsum[None, :])
        if HAS_DIAG:
            prob_col = tl.where(on_diag, prob_col - 1.0, prob_col)
        grad += prob_col
    valid = mask_m[:, None] & mask_n[None, :]
    grad = tl.where(valid, grad, 0.0)

    # Scale-gradient partials stay on the device: one slot per row tile of the
    # block and column tile of a panel, summed over the column panels in
    # launch order (deterministic, no atomics) and once at the end.
    slot = scale_grad_part_ptr + (row_start // BLOCK_M + pid_m).to(tl.int64) * scale_part_pitch + pid_n
    partial = tl.sum(tl.sum(grad * cosine, axis=1), axis=0)
    if col_start == 0:
        tl.store(slot, partial)
    else:
        tl.store(slot, tl.load(slot) + partial)
    if FOLD_INV_NORMS:
        shift_x, shift_y, _, _ = _fold_shifts(inv_range_ptr)
        grad = grad * (inv_x * shift_x)[:, None] * (inv_y * shift_y)[None, :]
    g_ptrs = (grad_panel_ptr + local_m[:, None].to(tl.int64) * stride_gm
              + local_n[None, :].to(tl.int64) * stride_gn)
    tl.store(g_ptrs, grad.to(grad_panel_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _exponent_of(value):
    """floor(log2(value)) of a positive fp32 scalar, within [-126, 127]."""
    return tl.minimum(tl.maximum(((value.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -126), 127)


@triton.jit
def _pow2(exponent):
    """2^exponent, exactly, for an integer exponent in [-126, 127]."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fold_shifts(inv_range_ptr):
    """(shift_x, shift_y, undo_a, undo_b): powers of two for the folded panel.

    The panel holds G_ij (inv_x_i shift_x) (inv_y_j shift_y) and the products
    multiply their tiles by undo_a undo_b = 1 / (shift_x shift_y), so the
    accumulators hold what they did without shifts. Unshifted, G inv_x inv_y
    underflows fp32/bf16 once |x| |y| passes ~1e30 (rows of 1e20 left the
    panel as zeros and subnormals). inv_range_ptr holds (max inv_x, max
    inv_y, min inv_x, min inv_y). The total shift T is the largest that keeps
    the panel (|G| <= 2) and the product tiles (2^T inv_x |G Y^|, |G Y^| up to
    N + 3) below 2^126 for N < 2^23; the split between the sides keeps both
    factor vectors within 2^+-102. Where even that cannot hold every panel
    entry within fp32's normal range (rows below eps = 1e-12 and rows past
    ~1e19 on both sides of one batch), undo_a is NaN: the feature gradients
    come out NaN rather than silently without those entries. Powers of two
    are exact: in range, the gradients are bit for bit the unshifted ones.
    """
    hi_x = _exponent_of(tl.load(inv_range_ptr))
    hi_y = _exponent_of(tl.load(inv_range_ptr + 1))
    lo_x = _exponent_of(tl.load(inv_range_ptr + 2))
    lo_y = _exponent_of(tl.load(inv_range_ptr + 3))
    total = 100 - tl.maximum(hi_x + hi_y, tl.maximum(hi_x, hi_y))
    low = tl.maximum(-102 - lo_x, total - 102 + hi_y)
    high = tl.minimum(102 - hi_x, total + 102 + lo_y)
    ex = tl.minimum(tl.maximum((low + high) >> 1, -126), 127)
    ey = tl.minimum(tl.maximum(total - ex, -126), 127)
    representable = ((low <= high) & (ex + ey == total)
                     & (lo_x + lo_y + total >= -125))
    first = tl.minimum(total, 126)
    undo_a = tl.where(representable, _pow2(-first), float("nan"))
    return _pow2(ex), _pow2(ey), undo_a, _pow2(first - total)


@triton.jit
def _accumulate_product_tile(
    pid, a_ptr, b_ptr, b_row_scale_ptr, c_ptr, c_lo_ptr, inv_range_ptr,
    M, K, D, b_row0, c_row0,
    stride_am, stride_ak, stride_bk, stride_bd, stride_cm, stride_cd,
    SCALE_B_ROWS: tl.constexpr, SPLIT_ACC: tl.constexpr, UNSHIFT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One BLOCK_M x BLOCK_D tile of C += A (M x K) @ diag(b_row_scale) B (K x D).

    B's rows start at row ``b_row0`` of ``b_ptr`` (and of the row scales), C's
    at row ``c_row0`` of ``c_ptr``: the launcher passes whole tensors, never
    slices, so a panel costs no host-side tensor operations.

    C is fp32, or (SPLIT_ACC) a 24-bit float held as two planes: the top 16
    bits of the fp32 pattern in ``c_ptr`` (int16 view of the 16-bit gradient
    output itself) and the next 8 bits in ``c_lo_ptr`` (uint8). 15 mantissa
    bits keep the accumulation error far below the final fp16/bf16 rounding
    at half the memory of an fp32 accumulator.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_d = tl.cdiv(D, BLOCK_D)
    # Grouped ordering: neighbouring programs share B columns in L2.
    group_size = GROUP_M * num_pid_d
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_d = (pid % group_size) // group_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask_m = offs_m < M
    mask_d = offs_d < D
    # Row offsets move the base pointers once (scalar int64 arithmetic), so the
    # per-element addresses stay as cheap as for a slice.
    b_ptr += tl.cast(b_row0, tl.int64) * stride_bk
    b_row_scale_ptr += b_row0
    c_ptr += tl.cast(c_row0, tl.int64) * stride_cm
    c_lo_ptr += tl.cast(c_row0, tl.int64) * stride_cm
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_d[None, :] * stride_bd,
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        if SCALE_B_ROWS:
            # Normalise the feature rows on the fly, rounding to the dot dtype
            # exactly where PyTorch would round its normalised copy.
            row_scale = tl.load(b_row_scale_ptr + offs_k, mask=mask_k, other=0.0)
            b = b.to(tl.float32) * row_scale[:, None]
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    if UNSHIFT:
        # The panel carried 2^T (``_fold_shifts``): exact, in two factors
        # (T may pass 126), the larger first.
        _, _, undo_a, undo_b = _fold_shifts(inv_range_ptr)
        acc = acc * undo_a * undo_b

    c_offs = offs_m[:, None] * stride_cm + offs_d[None, :] * stride_cd
    mask_c = mask_m[:, None] & mask_d[None, :]
    if SPLIT_ACC:
        hi = tl.load(c_ptr + c_offs, mask=mask_c, other=0).to(tl.int32)
        lo = tl.load(c_lo_ptr + c_offs, mask=mask_c, other=0).to(tl.int32)
        total = ((hi << 16) | (lo << 8)).to(tl.float32, bitcast=True) + acc
        bits = total.to(tl.int32, bitcast=True)
        # Round the dropped byte to nearest, except for NaN: GPUs produce NaN as
        # 0x7FFFFFFF, which the carry would wrap into -0.0.
        bits = tl.where(total == total, bits + 0x80, bits)
        tl.store(c_ptr + c_offs, (bits >> 16).to(tl.int16), mask=mask_c)
        tl.store(c_lo_ptr + c_offs, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask_c)
    else:
        tl.store(c_ptr + c_offs, tl.load(c_ptr + c_offs, mask=mask_c, other=0.0) + acc, mask=mask_c)


@triton.jit
def _panel_grads_kernel(
    grad_panel_ptr, stride_gm, stride_gn, rows, cols, D, row_start, col_start, gx_row0,
    x_ptr, stride_xn, stride_xd, inv_x_ptr,
    y_ptr, stride_yn, stride_yd, inv_y_ptr,
    gx_ptr, stride_gxm, stride_gxd,
    gy_ptr, gy_lo_ptr, stride_gym, stride_gyd,
    inv_range_ptr, x_tiles,
    WITH_X: tl.constexpr, WITH_Y: tl.constexpr,
    SCALE_ROWS: tl.constexpr, SPLIT_ACC_Y: tl.constexpr, UNSHIFT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Both products of one G panel in a single launch (twice the tiles to fill
    the GPU): dX^[rows] += G @ Y^[cols] and dY^[cols] += G^T @ X^[rows]. The
    panel covers rows row_start.. of X and col_start.. of Y; dX^ lands at row
    gx_row0 + i of gx (0 for a panel-sized buffer), dY^ at row col_start + j."""
    # WITH_X / WITH_Y compile out a side nobody asked for: its registers
    # would count against the other (a spill, for an unused branch).
    pid = tl.program_id(0)
    if WITH_X and (pid < x_tiles or not WITH_Y):
        _accumulate_product_tile(
            pid, grad_panel_ptr, y_ptr, inv_y_ptr, gx_ptr, gx_ptr, inv_range_ptr,
            rows, cols, D, col_start, gx_row0,
            stride_gm, stride_gn, stride_yn, stride_yd, stride_gxm, stride_gxd,
            SCALE_ROWS, False, UNSHIFT, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_K,
            GROUP_M)
    elif WITH_Y:
        _accumulate_product_tile(
            pid - x_tiles, grad_panel_ptr, x_ptr, inv_x_ptr, gy_ptr, gy_lo_ptr, inv_range_ptr,
            cols, rows, D, row_start, col_start,
            stride_gn, stride_gm, stride_xn, stride_xd, stride_gym, stride_gyd,
            SCALE_ROWS, SPLIT_ACC_Y, UNSHIFT, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_D,
            BLOCK_K, GROUP_M)


@triton.jit
def _load_accumulator(acc_ptr, acc_lo_ptr, offs, mask, SPLIT_ACC: tl.constexpr):
    # One return at the end: compiled code (not the interpreter) types an early
    # return inside a constexpr branch against the fall-through one, and an
    # int16 pointer's load is not fp32 ("Return type mismatch").
    if SPLIT_ACC:
        hi = tl.load(acc_ptr + offs, mask=mask, other=0).to(tl.int32)
        lo = tl.load(acc_lo_ptr + offs, mask=mask, other=0).to(tl.int32)
        value = ((hi << 16) | (lo << 8)).to(tl.float32, bitcast=True)
    else:
        value = tl.load(acc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return value


@triton.jit
def _grad_and_unit_chunk(acc_ptr, acc_lo_ptr, stride_am, stride_ad, feat_ptr, stride_fm, stride_fd,
                         inv_norm, factor, offs_r, mask_r, k0, D,
                         WITH_UNIT: tl.constexpr, SPLIT_ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """factor * accumulator and (WITH_UNIT) the unit feature rows, for columns k0 + [0, BLOCK_D)."""
    offs_d = k0 + tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (offs_d[None, :] < D)
    g = _load_accumulator(acc_ptr, acc_lo_ptr,
                          offs_r[:, None] * stride_am + offs_d[None, :] * stride_ad,
                          mask, SPLIT_ACC) * factor
    unit = g
    if WITH_UNIT:
        unit = tl.load(feat_ptr + offs_r[:, None] * stride_fm + offs_d[None, :] * stride_fd,
                       mask=mask, other=0.0).to(tl.float32) * inv_norm[:, None]
    return g, unit, mask


@triton.jit
def _finish_grad_kernel(
    acc_ptr, acc_lo_ptr, stride_am, stride_ad,
    feat_ptr, stride_fm, stride_fd, inv_norm_ptr,
    out_ptr, stride_om, stride_od, factor_ptr,
    M, D,
    NORMALIZE: tl.constexpr, TIMES_INV_NORM: tl.constexpr, SPLIT_ACC: tl.constexpr,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = normalize_backward(factor * acc): (g - x^ <x^, g>) / max(|x|, eps).

    When the panel already carried the inverse norms (acc = inv_norm * dX^),
    TIMES_INV_NORM is off: the projection is linear, so only (g - x^ <x^, g>)
    remains. Two sweeps over each row (the radial component first), so no N x d
    temporaries. ``out`` may alias ``acc`` (the split accumulator's high plane,
    or the fp32 gradient itself): a barrier separates each chunk's loads from
    its stores.
    """
    pid = tl.program_id(0)
    offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = offs_r < M
    factor = tl.load(factor_ptr)
    inv_norm = tl.load(inv_norm_ptr + offs_r, mask=mask_r, other=0.0)
    if NORMALIZE:
        radial = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            g, unit, _ = _grad_and_unit_chunk(
                acc_ptr, acc_lo_ptr, stride_am, stride_ad, feat_ptr, stride_fm, stride_fd,
                inv_norm, factor, offs_r, mask_r, k0, D, True, SPLIT_ACC, BLOCK_D)
            radial += tl.sum(g * unit, axis=1)
        # Below eps the clamp is active: x^ = x / eps, a Jacobian of I / eps.
        radial = tl.where(inv_norm * EPS < 1.0 - 1e-6, radial, 0.0)
    for k0 in range(0, D, BLOCK_D):
        g, unit, mask = _grad_and_unit_chunk(
            acc_ptr, acc_lo_ptr, stride_am, stride_ad, feat_ptr, stride_fm, stride_fd,
            inv_norm, factor, offs_r, mask_r, k0, D, NORMALIZE, SPLIT_ACC, BLOCK_D)
        offs_d = k0 + tl.arange(0, BLOCK_D)
        # ``out`` may alias the accumulator: every thread's loads of this chunk
        # must land before any thread's stores.
        tl.debug_barrier()
        if NORMALIZE:
            g = g - unit * radial[:, None]
            if TIMES_INV_NORM:
                g = g * inv_norm[:, None]
        tl.store(out_ptr + offs_r[:, None] * stride_om + offs_d[None, :] * stride_od,
                 g.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #

# One default config per dtype class; sizes chosen for H100-class GPUs. The
# interpreter runs tiles as numpy arrays; small tiles keep the multi-tile,
# multi-split and masked-edge paths exercised at the tiny sizes CI can afford.
_MIN_PANEL = 2048
_MAX_PANEL = 8192


# The forward and the backward's recomputation must round every logit alike
# (see _logits_from_dots). With FP contraction on, the compiler fused the
# backward's ``logits - row_max`` into one FMA on the unrounded product
# ``cosine * scale``, which the forward, needing the rounded logits for its
# max, did not: an ulp apart exactly where a one-hot softmax makes it a
# spurious gradient. Both tile kernels are therefore compiled without FP
# contraction (a ptxas --fmad=false build); the AOT check asserts it from the
# PTX. The GEMM-only kernels keep contraction.
_LOGIT_FUSION = False


def _tile_config(dot_dtype: torch.dtype, precision: str, interpret: bool) -> dict:
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


def _matmul_config(dot_dtype: torch.dtype, scale_rows: bool, precision: str,
                   interpret: bool) -> dict:
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


# Ahead-of-time compilation (``aot.py``) sizes grids for the GPU it compiles
# for, which this process need not have: it sets the SM count here.
_AOT_SM_COUNT: Optional[int] = None


def _num_programs_target(device: torch.device, interpret: bool) -> int:
    if _AOT_SM_COUNT is not None:
        return 2 * _AOT_SM_COUNT
    if interpret or device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _dot_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    # Same-dtype half inputs stay on the half-precision tensor-core path; any
    # mix is computed in fp32, which is never less accurate than either input.
    return x.dtype if x.dtype == y.dtype else torch.float32


def _rows_can_be_huge(dot_dtype: torch.dtype) -> bool:
    # fp16 rows stay below 65504 sqrt(d), far from 2^32 (``_huge_row_scales``).
    return dot_dtype != torch.float16


def _input_precision(dot_dtype: torch.dtype, allow_tf32: bool, interpret: bool) -> str:
    if dot_dtype != torch.float32 or interpret:
        return "ieee"
    return "tf32" if allow_tf32 else "ieee"


def _panel_size(n: int, d: int, panel: Optional[int], cfg: dict, mm_cfg: dict,
                sm_count: Optional[int] = None) -> int:
    """Side of the backward's gradient panels, a multiple of the tile size.

    Panels start on the forward pass's tile grid, so every tile is recomputed
    from the same rows and columns (see _logits_from_dots). By default a panel
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
        logits_programs = (candidate // cfg["BLOCK_M"]) * (candidate // cfg["BLOCK_N"])
        product_programs = 2 * (candidate // mm_cfg["BLOCK_M"]) * -(-d // mm_cfg["BLOCK_D"])
        return wasted(logits_programs) + wasted(product_programs)

    lo, hi = max(tile, (3 * side // 4) // tile * tile), min(-(-n // 2), 5 * side // 4)
    candidates = range(lo, max(lo, hi) + 1, tile)
    return min(candidates, key=lambda c: (round(cost(c), 3), abs(c - side)))


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
    _refuse_interpreted_bf16(x, y)
    m, d = x.shape
    k = y.shape[0]
    interpret = interpreter_active()
    dot_dtype = _dot_dtype(x, y)
    precision = _input_precision(dot_dtype, allow_tf32, interpret)
    cfg = _tile_config(dot_dtype, precision, interpret)
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
            BLOCK_R=block_r, BLOCK_D=block_d,
        )


def folds_inv_norms(x, y, normalize: bool) -> bool:
    """Whether ``block_grads`` folds the inverse norms into the gradient panel.

    Folding lets both panel products read raw feature rows straight into the
    tensor cores. fp16 panels keep them out: a near-zero row (inv_norm up to
    1e12) would overflow fp16's 65504.
    """
    return normalize and _dot_dtype(x, y) != torch.float16


def launch_panel_products(grad_panel, rows, cols, row_start, col_start, gx_row0, x, inv_x, y,
                          inv_y, gx, gy, gy_lo, inv_range, need_x, need_y, *, split_acc_y,
                          scale_rows, unshift, dot_dtype, precision, mm_cfg):
    """dX^ += G Y^ and dY^ += G^T X^ for one rows x cols panel of G, in one
    launch (``_panel_grads_kernel``): shared by the CLIP and SigLIP backwards."""
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
    _refuse_interpreted_bf16(x, y)
    m, d = x.shape
    k = y.shape[0]
    interpret = interpreter_active()
    dot_dtype = _dot_dtype(x, y)
    precision = _input_precision(dot_dtype, allow_tf32, interpret)
    cfg = _tile_config(dot_dtype, precision, interpret)
    fold = folds_inv_norms(x, y, normalize)
    mm_cfg = _matmul_config(dot_dtype, normalize and not fold, precision, interpret)
    sm_count = _num_programs_target(x.device, interpret) // 2 if not interpret else None
    side = _panel_size(max(m, k), d, panel, cfg, mm_cfg, sm_count)
    device = x.device
    need_x = x_out is not None or x_acc is not None
    need_y = y_acc is not None

    panel_acc = None
    if x_out is not None:
        panel_acc = torch.empty(min(side, m), d, dtype=torch.float32, device=device)
    grad_panel = torch.empty(min(side, m), min(side, k), dtype=dot_dtype, device=device)
    scale_part_pitch = triton.cdiv(min(side, k), cfg["BLOCK_N"])
    scale_grad_part = torch.empty(triton.cdiv(m, cfg["BLOCK_M"]), scale_part_pitch,
                                  dtype=torch.float32, device=device)
    unused = scale_grad_part  # pointer arguments a specialisation never reads
    row_max, row_logsum = row_stats if row_stats is not None else (unused, unused)
    col_max, col_logsum = col_stats if col_stats is not None else (unused, unused)
    gx, gx_is_panel = (panel_acc, True) if panel_acc is not None else (
        (x_acc, False) if x_acc is not None else (unused, True))
    gy = y_acc if need_y else unused
    gy_lo = y_acc_lo if y_acc_lo is not None else gy
    bias_arg = bias if bias is not None else scale
    # (max inv_x, max inv_y, min inv_x, min inv_y) for _fold_shifts: three
    # small launches per call, none per panel, no host synchronisation.
    inv_range = unused
    if fold:
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
            with _one_launch_at_a_time():
                _grad_logits_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_N"]))](
                    x, y, inv_x, inv_y, scale, bias_arg,
                    row_max, row_logsum, col_max, col_logsum, grad_panel, scale_grad_part,
                    inv_range,
                    m, k, d, diag_offset or 0, row_start, col_start, rows, cols, scale_part_pitch,
                    x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                    grad_panel.stride(0), grad_panel.stride(1),
                    HAS_BIAS=bias is not None, HAS_DIAG=diag_offset is not None,
                    USE_ROWS=row_stats is not None, USE_COLS=col_stats is not None,
                    FOLD_INV_NORMS=fold, GUARD_HUGE=_rows_can_be_huge(dot_dtype),
                    DOT_DTYPE=_TORCH_TO_TL[dot_dtype], INPUT_PRECISION=precision,
                    enable_fp_fusion=_LOGIT_FUSION,
                    **cfg,
                )
            if not (need_x or need_y):
                continue
            launch_panel_products(
                grad_panel, rows, cols, row_start, col_start, 0 if gx_is_panel else row_start,
                x, inv_x, y, inv_y, gx, gy, gy_lo, inv_range, need_x, need_y,
                split_acc_y=y_acc_lo is not None, scale_rows=normalize and not fold, unshift=fold,
                dot_dtype=dot_dtype,
                precision=precision, mm_cfg=mm_cfg)
        if x_out is not None:
            finish_feature_grad(
                panel_acc, x[row_start:row_start + rows], inv_x[row_start:row_start + rows],
                x_factor, normalize, fold, x_out[row_start:row_start + rows])
    return scale_grad_part.sum()


def merge_partial_sums(part_max: torch.Tensor, part_sum: torch.Tensor):
    """Merge (max, sum exp(L - max)) partials over dim 0 into one (max, sum)."""
    total_max = part_max.max(dim=0).values
    return total_max, (part_sum * torch.exp(part_max - total_max[None, :])).sum(dim=0)


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


def _feature_and_scale_grads(x, y, inv_x, inv_y, scale, bias, row_stats, col_stats, diag_offset,
                             coef, need_x, need_y, need_scale, scale_meta, normalize, allow_tf32,
                             panel):
    """Input gradients of a loss that is ``coef`` x the sum over one block's G."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    grad_y = y_acc = y_acc_lo = grad_scale = None
    if need_y:
        grad_y, y_acc, y_acc_lo = _half_precision_accumulator(y)
    factor = (scale * coef).contiguous()
    scale_grad = block_grads(
        x, y, inv_x, inv_y, scale, bias, row_stats, col_stats, diag_offset,
        normalize=normalize, allow_tf32=allow_tf32, panel=panel,
        x_out=grad_x, x_factor=factor, y_acc=y_acc, y_acc_lo=y_acc_lo)
    if need_y:
        finish_feature_grad(y_acc, y, inv_y, factor, normalize, folds_inv_norms(x, y, normalize),
                            grad_y, acc_lo=y_acc_lo)
    if need_scale:
        grad_scale = (scale_grad * coef).reshape(scale_meta[0]).to(scale_meta[1])
    return grad_x, grad_y, grad_scale


def _scalars(scale, bias):
    scale_f32 = scale.detach().reshape(1).float().contiguous()
    bias_f32 = bias.detach().reshape(1).float().contiguous() if bias is not None else None
    return scale_f32, bias_f32


# --------------------------------------------------------------------------- #
# Operators and autograd Functions
# --------------------------------------------------------------------------- #


def triton_forward(x, y, scale, bias, options: KernelOptions):
    """(loss, stats) through the fused kernels (see ``clipfast.backends._ops``)."""
    scale_f32, bias_f32 = _scalars(scale, bias)
    inv_x, inv_y = inverse_norms(x, options.normalize), inverse_norms(y, options.normalize)
    row_max, row_sum, col_max, col_sum, diag = block_stats(
        x, y, inv_x, inv_y, scale_f32, bias_f32, 0, True, options.allow_tf32)
    row_logsum, col_logsum = torch.log(row_sum), torch.log(col_sum)
    loss = clip_loss_from_stats(row_max, row_logsum, col_max, col_logsum, diag)
    return loss, pack_stats(inv_x, inv_y, row_max, row_logsum, col_max, col_logsum)


def triton_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                    need_x: bool, need_y: bool, need_scale: bool):
    inv_x, inv_y, row_max, row_logsum, col_max, col_logsum = stats
    scale_f32, bias_f32 = _scalars(scale, bias)
    coef = grad_loss.float().reshape(1) / (2 * x.shape[0])
    return _feature_and_scale_grads(
        x, y, inv_x, inv_y, scale_f32, bias_f32, (row_max, row_logsum), (col_max, col_logsum), 0,
        coef, need_x, need_y, need_scale, (scale.shape, scale.dtype), options.normalize,
        options.allow_tf32, options.block or None)


triton_clip_loss_op = define_clip_loss_op("triton", triton_forward, triton_backward)


class TritonRowCrossEntropyFunction(torch.autograd.Function):
    """mean_i CE(s Q^_i K^^T + b, label i + label_offset) with the fused kernels:
    one direction of the loss over a rectangular block (open_clip's local_loss).
    ``extra_logits``: as ``chunked.ChunkedRowCrossEntropyFunction``'s."""

    @staticmethod
    @without_autocast
    def forward(ctx, queries, keys, scale, bias, normalize: bool, label_offset: int,
                allow_tf32: bool, panel, extra_logits=None):
        scale_f32, bias_f32 = _scalars(scale, bias)
        inv_q, inv_k = inverse_norms(queries, normalize), inverse_norms(keys, normalize)
        row_max, row_sum, _, _, diag = block_stats(
            queries, keys, inv_q, inv_k, scale_f32, bias_f32, label_offset, False, allow_tf32)
        extra = with_bias(extra_logits, None if bias_f32 is None else bias_f32.reshape(()))
        if extra is not None:
            row_max, row_sum = merge_extra_logits(row_max, row_sum, extra)
        row_logsum = torch.log(row_sum)
        loss = ((row_max - diag) + row_logsum).mean()
        ctx.save_for_backward(queries, keys, scale_f32, bias_f32, inv_q, inv_k, row_max, row_logsum,
                              extra)
        ctx.scale_meta = (scale.shape, scale.dtype)
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        ctx.options = (normalize, label_offset, allow_tf32, panel)
        return loss

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss):
        refuse_double_backward("clipfast's local_loss mode (triton)", DISTRIBUTED_DOUBLE_BACKWARD)
        queries, keys, scale, bias, inv_q, inv_k, row_max, row_logsum, extra = ctx.saved_tensors
        need_q, need_k, need_scale, need_bias = ctx.needs_input_grad[:4]
        normalize, label_offset, allow_tf32, panel = ctx.options
        coef = grad_loss.float().reshape(1) / queries.shape[0]
        grad_q = grad_k = grad_scale = grad_bias = None
        if need_q or need_k or need_scale:
            grad_q, grad_k, grad_scale = _feature_and_scale_grads(
                queries, keys, inv_q, inv_k, scale, bias, (row_max, row_logsum), None, label_offset,
                coef, need_q, need_k, need_scale, ctx.scale_meta, normalize, allow_tf32, panel)
        if need_bias:
            grad_bias = exact_zero_bias_grad(row_logsum, row_logsum, grad_loss.float(), *ctx.bias_meta)
        grads = (grad_q, grad_k, grad_scale, grad_bias, None, None, None, None)
        if len(ctx.needs_input_grad) == len(grads):  # called without extra_logits
            return grads
        grad_extra = None
        if ctx.needs_input_grad[8]:
            grad_extra = extra_logits_grad(extra, row_max, row_logsum, coef)
        return grads + (grad_extra,)


class TritonBlockOps:
    """The same operations with the fused Triton kernels (CUDA, or the interpreter)."""

    def __init__(self, x, y, normalize: bool, block: int, allow_tf32: bool = True):
        self.dtype = torch.float32
        self.normalize = normalize
        self.allow_tf32 = allow_tf32
        self.folded = folds_inv_norms(x, y, normalize)

    def inverse_norms(self, features):
        return inverse_norms(features, self.normalize)

    def scalars(self, scale, bias):
        s = scale.detach().reshape(1).float().contiguous()
        return s, bias.detach().reshape(1).float().contiguous() if bias is not None else None

    def stats(self, x, inv_x, y, inv_y, s, b, diag_offset, with_cols=True):
        return block_stats(x, y, inv_x, inv_y, s, b, diag_offset, with_cols, self.allow_tf32)

    def new_accumulator(self, rows, d, device):
        return torch.zeros(rows, d, dtype=torch.float32, device=device)

    def grads(self, x, inv_x, y, inv_y, s, b, row_stats, col_stats, diag_offset, x_acc, y_acc):
        """x_acc += G Y^, y_acc += G^T X^ (carrying the inverse norms when folded)."""
        return block_grads(
            x, y, inv_x, inv_y, s, b, row_stats, col_stats, diag_offset,
            normalize=self.normalize, allow_tf32=self.allow_tf32, panel=None,
            x_acc=x_acc, y_acc=y_acc)

    def finish(self, acc, features, inv_norm, s, coef):
        out = torch.empty(features.shape, dtype=features.dtype, device=features.device)
        factor = (s.reshape(1) * coef.reshape(1)).float().contiguous()
        finish_feature_grad(acc, features, inv_norm, factor, self.normalize,
                                         self.folded, out)
        return out
