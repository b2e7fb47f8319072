"""Backward-pass kernels: the gradient panels of both losses, the panel
products they share and the normalisation backward that finishes them.

CLIP backward (recomputation from the saved LSEs):
  * ``_grad_logits_kernel`` recomputes one panel of logits and writes the
    unscaled gradient weights P + Q - 2*I (values in [-2, 2], so fp16/bf16
    panels neither overflow nor flush) and accumulates per-tile partial sums
    for the scale gradient on the device. A panel is at most PANEL x PANEL
    (8192^2 by default) and never the whole N x N matrix.
  * ``_panel_grads_kernel`` accumulates dX^ += G @ Y^ and dY^ += G^T @ X^
    in one launch. The panel carries the inverse norms (G_ij inv_x_i inv_y_j),
    so both products read the raw feature rows and no normalised copy is ever
    stored; the 1/|x| of the normalisation backward cancels against them.
    (fp16 panels instead normalise feature rows on load: see
    ``launchers.folds_inv_norms``.) dX^ of the current row panel lives in a
    PANEL x d fp32 buffer; dY^ lives in the gradient output itself (fp32), or
    for fp16/bf16 as a 24-bit float split over the 16-bit output and a byte
    plane, which keeps accumulation error far below the final rounding.
  * ``_finish_grad_kernel`` applies the normalisation backward and the
    s * grad_out / (2N) factor in place, without N x d temporaries.

SigLIP backward (6 N^2 d FLOPs): per panel of the logits,
``_siglip_grad_kernel`` recomputes the tile as the CLIP kernel does
(``_panel_tile``), writes W
(times inv_x_i inv_y_j, as the CLIP gradient panel, so the products read raw
feature rows; fp16 panels hold 2^14 W instead) and per-tile partial sums of
W * cosine and W for the scale and bias gradients; ``_panel_grads_kernel``
then accumulates dX^ += W Y^ and dY^ += W^T X^, and ``_finish_grad_kernel``
applies the normalisation backward and the factor s * grad / N.

Extra memory beyond the two gradients (either loss): O(N) statistics, one G
panel (about N*d/4 elements, at most 8192^2), a PANEL x d fp32 buffer and,
for fp16/bf16 text features, an N x d byte plane (0.25 of the gradients).
For SigLIP at N = 65536, d = 768 the panel and buffer come to about 0.12 of
the gradients at the default panel side.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tile_math import (_fold_inv_norms, _fold_shifts, _load_accumulator, _panel_tile,
                        _reciprocal_1_2, _rounded_for_store, _tile_coords)


@triton.jit
def _grad_logits_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr,
    row_max_ptr, row_logsum_ptr, col_max_ptr, col_logsum_ptr, grad_panel_ptr, scale_grad_part_ptr,
    inv_range_ptr,
    M, K, D, diag_offset, row_start, col_start, panel_rows, panel_cols, scale_part_pitch,
    stride_xn, stride_xd, stride_yn, stride_yd,
    stride_gm, stride_gn,
    HAS_BIAS: tl.constexpr, HAS_DIAG: tl.constexpr,
    USE_ROWS: tl.constexpr, USE_COLS: tl.constexpr, FOLD_INV_NORMS: tl.constexpr,
    GUARD_HUGE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of the gradient panel: (P - I) [USE_ROWS] + (Q - I) [USE_COLS],
    I marking column i + diag_offset of row i (HAS_DIAG); times inv_x_i * inv_y_j
    * 2^shift with FOLD_INV_NORMS (``_fold_shifts``), so the panel products can
    take raw feature rows."""
    (pid_m, pid_n, local_m, local_n, offs_m, offs_n, mask_m, mask_n,
     inv_x, inv_y, cosine, logits) = _panel_tile(
        x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr,
        M, K, D, row_start, col_start, panel_rows, panel_cols,
        stride_xn, stride_xd, stride_yn, stride_yd, HAS_BIAS,
        # The CLIP launchers always pass inverse norms (ones without
        # normalisation), and the statistics were taken with them.
        NORMALIZE=True,
        GUARD_HUGE=GUARD_HUGE, DOT_DTYPE=DOT_DTYPE, INPUT_PRECISION=INPUT_PRECISION,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
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
        grad = _fold_inv_norms(grad, inv_x, inv_y, inv_range_ptr)
    g_ptrs = (grad_panel_ptr + local_m[:, None].to(tl.int64) * stride_gm
              + local_n[None, :].to(tl.int64) * stride_gn)
    tl.store(g_ptrs, grad.to(grad_panel_ptr.dtype.element_ty), mask=valid)


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
    # Grouped ordering: neighbouring programs share B columns in L2.
    pid_m, pid_d = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_D), GROUP_M)

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
    total = _load_accumulator(c_ptr, c_lo_ptr, c_offs, mask_c, SPLIT_ACC) + acc
    if SPLIT_ACC:
        bits = total.to(tl.int32, bitcast=True)
        # Round the dropped byte to nearest, except for NaN: GPUs produce NaN as
        # 0x7FFFFFFF, which the carry would wrap into -0.0.
        bits = tl.where(total == total, bits + 0x80, bits)
        tl.store(c_ptr + c_offs, (bits >> 16).to(tl.int16), mask=mask_c)
        tl.store(c_lo_ptr + c_offs, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask_c)
    else:
        tl.store(c_ptr + c_offs, total, mask=mask_c)


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
    EPS: tl.constexpr, RTNE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
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
        g = _rounded_for_store(g, RTNE_BF16)
        tl.store(out_ptr + offs_r[:, None] * stride_om + offs_d[None, :] * stride_od,
                 g.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _siglip_grad_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr, grad_panel_ptr,
    scale_grad_part_ptr, bias_grad_part_ptr, inv_range_ptr,
    M, K, D, row_start, col_start, panel_rows, panel_cols, part_pitch,
    stride_xn, stride_xd, stride_yn, stride_yd,
    stride_gm, stride_gn,
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, NORMALIZE: tl.constexpr,
    FOLD_INV_NORMS: tl.constexpr, PANEL_SCALE: tl.constexpr,
    GUARD_HUGE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of the gradient panel: W = -z sigmoid(-z L) (|W| <= 1, safe in
    fp16/bf16), times inv_x_i inv_y_j (and the powers of two of
    ``_fold_shifts``) with FOLD_INV_NORMS, plus the tile's sums of W * cosine
    and of W."""
    (pid_m, pid_n, local_m, local_n, _, _, mask_m, mask_n,
     inv_x, inv_y, cosine, logits) = _panel_tile(
        x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr,
        M, K, D, row_start, col_start, panel_rows, panel_cols,
        stride_xn, stride_xd, stride_yn, stride_yd,
        HAS_BIAS, NORMALIZE, GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    # sigmoid(L) and sigmoid(-L) from e = exp(-|L|): (1 or e) / (1 + e), never
    # 1 - sigmoid, which would lose the small one to cancellation.
    e = tl.exp2(tl.abs(logits) * -1.4426950408889634)
    r = _reciprocal_1_2(1.0 + e)
    above = logits >= 0.0
    if POSITIVES:
        # -z sigmoid(-zL): sigmoid(L) off the diagonal, -sigmoid(-L) on it; a
        # select per element rather than a branch (see the forward kernel).
        on_diag = (local_m + (row_start - col_start))[:, None] == local_n[None, :]
        grad = tl.where(above != on_diag, 1.0, e) * r
        grad = tl.where(on_diag, -grad, grad)
    else:
        grad = tl.where(above, 1.0, e) * r
    if FOLD_INV_NORMS:
        folded = _fold_inv_norms(grad, inv_x, inv_y, inv_range_ptr)
    else:
        # fp16 panels hold 2^14 W: sigmoid(-10) = 4.5e-5, the weight of a
        # negative at open_clip's initial bias, is below fp16's normal range
        # (6.1e-5) and would lose bits; times 2^14 W stays normal down to
        # 3.7e-9 and below 65504.
        folded = grad * PANEL_SCALE
    g_ptrs = (grad_panel_ptr + local_m[:, None].to(tl.int64) * stride_gm
              + local_n[None, :].to(tl.int64) * stride_gn)
    # Only edge tiles pay for the mask. Both branches end in scalars and
    # stores: a tile-sized value merged from two branches would stay live
    # across them (registers).
    if ((pid_m + 1) * BLOCK_M <= panel_rows) & ((pid_n + 1) * BLOCK_N <= panel_cols):
        scale_partial = tl.sum(tl.sum(grad * cosine, axis=1), axis=0)
        bias_partial = tl.sum(tl.sum(grad, axis=1), axis=0)
        tl.store(g_ptrs, folded.to(grad_panel_ptr.dtype.element_ty))
    else:
        valid = mask_m[:, None] & mask_n[None, :]
        scale_partial = tl.sum(tl.sum(tl.where(valid, grad * cosine, 0.0), axis=1), axis=0)
        bias_partial = tl.sum(tl.sum(tl.where(valid, grad, 0.0), axis=1), axis=0)
        tl.store(g_ptrs, folded.to(grad_panel_ptr.dtype.element_ty), mask=valid)

    # One slot per row tile of the block and column tile of a panel, summed
    # over the column panels in launch order (deterministic, no atomics) and
    # once at the end.
    slot = (row_start // BLOCK_M + pid_m).to(tl.int64) * part_pitch + pid_n
    if col_start == 0:
        tl.store(scale_grad_part_ptr + slot, scale_partial)
        tl.store(bias_grad_part_ptr + slot, bias_partial)
    else:
        tl.store(scale_grad_part_ptr + slot, tl.load(scale_grad_part_ptr + slot) + scale_partial)
        tl.store(bias_grad_part_ptr + slot, tl.load(bias_grad_part_ptr + slot) + bias_partial)
