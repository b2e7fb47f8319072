"""The hybrid backend's Triton kernels: epilogues over fp32 panels of dot
products that a library GEMM (cuBLAS through torch) wrote. None of them calls
``tl.dot``: the interpreter runs them exactly as a GPU would (up to the order
of fp32 sums), so the CPU tests check their arithmetic in every dtype.

A panel holds ``dots[i, j] = <x'_i, y'_j>`` for P rows against K columns,
fp32, row-major with row stride ``stride_dm`` (x', y' are the GEMM operands:
the feature rows, or rows times a power of two, see ``panels.Operands``).
Every kernel turns a tile into cosines and logits the same way
(``_panel_tile``), so the forward and the backward see bit-identical logits
for the same dots.

  _softmax_stats_kernel   forward, softmax losses: row (max, sum exp) partials
                          per column split, column partials per row block,
                          the label logits
  _merge_stats_kernel     merges those partials (in launch order: deterministic)
  _sigmoid_sum_kernel     forward, SigLIP: compensated sums of -logsigmoid(z L)
  _grad_panel_kernel      backward, both losses: the panel turned into the
                          GEMM operand W = dloss/dL * s * inv_x * inv_y (times a
                          power of two), in place where it can, plus the
                          partial sums of the scale and bias gradients
"""

from __future__ import annotations

import triton
import triton.language as tl

# SigLIP's softplus tail and sigmoid pieces are the Triton backend's: the
# same polynomials, checked by the same tests.
from ..triton.tile_math import _inverse_norms_of as _load_inv
from ..triton.tile_math import _log1p_exp_neg_abs, _reciprocal_1_2

SOFTMAX = 0  # _grad_panel_kernel's LOSS: CLIP / InfoNCE rows and columns
SIGMOID = 1  # SigLIP


@triton.jit
def _panel_tile(dots_ptr, stride_dm, offs_m, mask_m, n0, col_hi, inv_x, inv_y_ptr, scale, bias,
                HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offs_n, mask_n, mask, cosines, logits) of the tile of columns
    [n0, n0 + BLOCK_N) below col_hi: the only place dots become logits."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < col_hi
    mask = mask_m[:, None] & mask_n[None, :]
    inv_y = _load_inv(inv_y_ptr, offs_n, mask_n, NORMALIZE, BLOCK_N)
    dots = tl.load(dots_ptr + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :],
                   mask=mask, other=0.0)
    cosine = dots * inv_x[:, None] * inv_y[None, :]
    logits = cosine * scale
    if HAS_BIAS:
        logits = logits + bias
    return offs_n, mask_n, mask, cosine, logits


@triton.jit
def _forward_program(M, K, inv_x_ptr, scale_ptr, bias_ptr, diag_offset, cols_per_split,
                     HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr):
    """What a forward program (row block, column split) starts from: its
    rows, their mask and inverse norms, the scalars, its column range and the
    rows' label columns."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    inv_x = _load_inv(inv_x_ptr, offs_m, mask_m, NORMALIZE, BLOCK_M)
    scale = tl.load(scale_ptr)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr)
    col_lo = pid_c * cols_per_split
    col_hi = tl.minimum(K, col_lo + cols_per_split)
    return pid_m, pid_c, offs_m, mask_m, inv_x, scale, bias, col_lo, col_hi, offs_m + diag_offset


@triton.jit
def _softmax_stats_kernel(
    dots_ptr, stride_dm, M, K, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr,
    row_max_part_ptr, row_sum_part_ptr, col_max_part_ptr, col_sum_part_ptr, diag_ptr,
    diag_offset, cols_per_split,
    HAS_BIAS: tl.constexpr, HAS_DIAG: tl.constexpr, WITH_COLS: tl.constexpr,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row block m, column split c): BLOCK_M rows against the columns
    [c * cols_per_split, (c + 1) * cols_per_split).

    Writes the rows' online (max, sum exp) over its columns to
    row_*_part[c, rows], each tile's column (max, sum exp) over its rows to
    col_*_part[m, cols] (WITH_COLS), and the label logit L[i, i + diag_offset]
    where its tile holds it (HAS_DIAG). The max is an online running max, never
    a fixed shift: rows far below the scale would underflow to log(0).
    """
    pid_m, pid_c, offs_m, mask_m, inv_x, scale, bias, col_lo, col_hi, label = _forward_program(
        M, K, inv_x_ptr, scale_ptr, bias_ptr, diag_offset, cols_per_split,
        HAS_BIAS, NORMALIZE, BLOCK_M)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        offs_n, mask_n, mask, _, logits = _panel_tile(
            dots_ptr, stride_dm, offs_m, mask_m, n0, col_hi, inv_x, inv_y_ptr, scale, bias,
            HAS_BIAS, NORMALIZE, BLOCK_N)
        logits = tl.where(mask, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        # All -inf so far (masked rows): shift by 0, not by -inf (NaN).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = (row_sum * tl.exp(row_max - shift)
                   + tl.sum(tl.exp(logits - shift[:, None]), axis=1))
        row_max = new_max
        if WITH_COLS:
            col_max = tl.max(logits, axis=0)
            col_shift = tl.where(col_max == float("-inf"), 0.0, col_max)
            col_sum = tl.sum(tl.exp(logits - col_shift[None, :]), axis=0)
            part = pid_m.to(tl.int64) * K + offs_n
            tl.store(col_max_part_ptr + part, col_max, mask=mask_n)
            tl.store(col_sum_part_ptr + part, col_sum, mask=mask_n)
        if HAS_DIAG:
            found = mask_m & (label >= n0) & (label < n0 + BLOCK_N) & (label < col_hi)
            if tl.max(found.to(tl.int32), axis=0) > 0:
                hit = label[:, None] == offs_n[None, :]
                value = tl.sum(tl.where(hit, logits, 0.0), axis=1)
                tl.store(diag_ptr + offs_m, value, mask=found)
    part = pid_c.to(tl.int64) * M + offs_m
    tl.store(row_max_part_ptr + part, row_max, mask=mask_m)
    tl.store(row_sum_part_ptr + part, row_sum, mask=mask_m)


@triton.jit
def _merge_stats_kernel(
    part_max_ptr, part_sum_ptr, parts, K, out_max_ptr, out_sum_ptr,
    ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[k] = merge over r < parts of (part_max[r, k], part_sum[r, k]), merged
    into out's own (max, sum) with ACCUMULATE. Sequential in r: the same
    result on every run."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = offs.to(tl.int64)
    mask = offs < K
    if ACCUMULATE:
        run_max = tl.load(out_max_ptr + offs, mask=mask, other=float("-inf"))
        run_sum = tl.load(out_sum_ptr + offs, mask=mask, other=0.0)
    else:
        run_max = tl.full((BLOCK,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK,), tl.float32)
    for r in range(0, parts):
        part_max = tl.load(part_max_ptr + r * K + offs, mask=mask, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + r * K + offs, mask=mask, other=0.0)
        new_max = tl.maximum(run_max, part_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + part_sum * tl.exp(part_max - shift)
        run_max = new_max
    tl.store(out_max_ptr + offs, run_max, mask=mask)
    tl.store(out_sum_ptr + offs, run_sum, mask=mask)


@triton.jit
def _kahan_add(total, compensation, value):
    """(total, compensation) + value, one Kahan step: a program's sums run
    over up to millions of logits, sequentially tile after tile."""
    corrected = value - compensation
    new_total = total + corrected
    compensation = (new_total - total) - corrected
    return new_total, compensation


@triton.jit
def _sigmoid_sum_kernel(
    dots_ptr, stride_dm, M, K, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr, part_ptr,
    diag_offset, cols_per_split,
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """part[m * splits + c] = sum of -logsigmoid(z_ij L_ij) over the program's
    rows and columns (z = +1 on L[i, i + diag_offset] with POSITIVES, -1
    elsewhere), compensated per row."""
    pid_m, pid_c, offs_m, mask_m, inv_x, scale, bias, col_lo, col_hi, label = _forward_program(
        M, K, inv_x_ptr, scale_ptr, bias_ptr, diag_offset, cols_per_split,
        HAS_BIAS, NORMALIZE, BLOCK_M)
    total = tl.zeros((BLOCK_M,), tl.float32)
    compensation = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        offs_n, mask_n, mask, _, logits = _panel_tile(
            dots_ptr, stride_dm, offs_m, mask_m, n0, col_hi, inv_x, inv_y_ptr, scale, bias,
            HAS_BIAS, NORMALIZE, BLOCK_N)
        if POSITIVES:
            signed = tl.where(label[:, None] == offs_n[None, :], logits, -logits)
        else:
            signed = -logits
        # -logsigmoid(u) = max(-u, 0) + log1p(exp(-|u|)), stable both ways.
        tail, _ = _log1p_exp_neg_abs(signed)
        value = tl.where(mask, tl.maximum(-signed, 0.0) + tail, 0.0)
        total, compensation = _kahan_add(total, compensation, tl.sum(value, axis=1))
    splits = tl.num_programs(1)
    tl.store(part_ptr + pid_m.to(tl.int64) * splits + pid_c,
             tl.sum(total, axis=0) - tl.sum(compensation, axis=0))


@triton.jit
def _grad_panel_kernel(
    dots_ptr, stride_dm, w_ptr, stride_wm, M, K,
    inv_x_ptr, inv_y_ptr, fold_x_ptr, fold_y_ptr, scale_ptr, bias_ptr,
    row_coef_ptr, col_coef_ptr, w_scale_ptr,
    row_max_ptr, row_logsum_ptr, col_max_ptr, col_logsum_ptr, diag_offset,
    scale_grad_part_ptr, bias_grad_part_ptr,
    LOSS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DIAG: tl.constexpr,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, NORMALIZE: tl.constexpr,
    IN_PLACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M rows of the panel, all K columns left to right.

    G = dloss/dL: SOFTMAX: row_coef (P - I) + col_coef (Q - I), with
    P = exp(L - row lse) (HAS_ROW), Q = exp(L - col lse) (HAS_COL), I the
    labels; SIGMOID: row_coef * (-z sigmoid(-z L)). Stores the GEMM operand
    W = G * s * fold_x_i * fold_y_j * w_scale in w's dtype (fold: the inverse
    norms of the rows the backward products read), and per program the
    compensated sums of G * cosine (the scale gradient) and of G (SigLIP's
    bias gradient).

    IN_PLACE: w is a 2-byte view over the fp32 dots rows (row i's W in the
    first half of row i's bytes). W of columns [n0, n0 + BLOCK_N) lands on the
    bytes of fp32 columns below n0 + BLOCK_N / 2, which this program has read
    (this or an earlier tile); the barrier orders the current tile's loads of
    every thread before any store.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    inv_x = _load_inv(inv_x_ptr, offs_m, mask_m, NORMALIZE, BLOCK_M)
    scale = tl.load(scale_ptr)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr)
    row_coef = tl.load(row_coef_ptr)
    col_coef = 0.0
    if HAS_COL:
        col_coef = tl.load(col_coef_ptr)
    fold_x = tl.load(fold_x_ptr + offs_m, mask=mask_m, other=0.0) * (scale * tl.load(w_scale_ptr))
    if HAS_ROW:
        row_max = tl.load(row_max_ptr + offs_m, mask=mask_m, other=0.0)
        row_logsum = tl.load(row_logsum_ptr + offs_m, mask=mask_m, other=0.0)
    label = offs_m + diag_offset
    scale_total = tl.zeros((BLOCK_M,), tl.float32)
    scale_comp = tl.zeros((BLOCK_M,), tl.float32)
    bias_total = tl.zeros((BLOCK_M,), tl.float32)
    bias_comp = tl.zeros((BLOCK_M,), tl.float32)
    w_rows = w_ptr + offs_m[:, None].to(tl.int64) * stride_wm
    for n0 in range(0, K, BLOCK_N):
        offs_n, mask_n, mask, cosine, logits = _panel_tile(
            dots_ptr, stride_dm, offs_m, mask_m, n0, K, inv_x, inv_y_ptr, scale, bias,
            HAS_BIAS, NORMALIZE, BLOCK_N)
        if HAS_DIAG:
            hit = label[:, None] == offs_n[None, :]
        else:
            hit = (offs_m[:, None] < 0) & (offs_n[None, :] < 0)  # no labels: all False
        if LOSS == 0:
            grad = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            if HAS_ROW:
                prob = tl.exp((logits - row_max[:, None]) - row_logsum[:, None])
                # (P - 1) on the labels is exact, where P + Q - 2 would round
                # P + Q at ulp(2) first.
                grad += row_coef * tl.where(hit, prob - 1.0, prob)
            if HAS_COL:
                col_max = tl.load(col_max_ptr + offs_n, mask=mask_n, other=0.0)
                col_logsum = tl.load(col_logsum_ptr + offs_n, mask=mask_n, other=0.0)
                prob = tl.exp((logits - col_max[None, :]) - col_logsum[None, :])
                grad += col_coef * tl.where(hit, prob - 1.0, prob)
        else:
            # sigmoid(L) and sigmoid(-L) from e = exp(-|L|): (1 or e) / (1 + e),
            # never 1 - sigmoid, which would cancel the small one away.
            e = tl.exp2(tl.abs(logits) * -1.4426950408889634)
            r = _reciprocal_1_2(1.0 + e)
            above = logits >= 0.0
            # -z sigmoid(-z L): sigmoid(L) for negatives, -sigmoid(-L) for positives.
            sig = tl.where(above != hit, 1.0, e) * r
            grad = row_coef * tl.where(hit, -sig, sig)
        grad = tl.where(mask, grad, 0.0)
        scale_total, scale_comp = _kahan_add(scale_total, scale_comp,
                                             tl.sum(grad * cosine, axis=1))
        if LOSS == 1:
            bias_total, bias_comp = _kahan_add(bias_total, bias_comp, tl.sum(grad, axis=1))
        fold_y = tl.load(fold_y_ptr + offs_n, mask=mask_n, other=0.0)
        w = grad * fold_x[:, None] * fold_y[None, :]
        if IN_PLACE:
            tl.debug_barrier()
        tl.store(w_rows + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_grad_part_ptr + pid_m, tl.sum(scale_total, axis=0) - tl.sum(scale_comp, axis=0))
    if LOSS == 1:
        tl.store(bias_grad_part_ptr + pid_m, tl.sum(bias_total, axis=0) - tl.sum(bias_comp, axis=0))
