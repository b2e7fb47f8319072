"""Forward-pass kernels: inverse norms, the CLIP statistics tiles and the
SigLIP softplus sum. Their tile math lives in ``tile_math``; the launchers
that size and start them in ``launchers``.

CLIP forward (one pass over the N x N tiles, 2*N^2*d FLOPs):
  * ``_inverse_norms_kernel``: inverse L2 norms of the feature rows.
  * ``_forward_tiles_kernel``: the grid is a ROW_SPLITS x COL_SPLITS grid of
    "super-tiles"; each program sweeps its super-tile column block by column
    block in BLOCK_M x BLOCK_N tiles computed on-chip (fp32 accumulation,
    norms and scale applied in the epilogue). Row statistics merge per tile
    into the program's slot of a (COL_SPLITS, N) buffer; column statistics
    are kept per tile element in registers and reduced once per column block
    into the program's slot of a (ROW_SPLITS, N) buffer. Both use an online
    (running max, running sum) log-sum-exp, so nothing underflows whatever
    the scale. The per-split partials are merged afterwards (O(splits * N),
    ``_stats.merge_partial_sums``) and kept as (max, log-sum) pairs rather
    than one rounded LSE: see ``_stats.clip_loss_from_stats``. The diagonal
    logits are read off the same tiles.

SigLIP forward (2 N^2 d FLOPs): ``_siglip_forward_kernel`` is a persistent
grid of about two programs per SM; each takes tiles in grouped order
(programs running at once share operand rows in L2), computes the tile's dot
products on-chip with fp32 accumulation through the CLIP kernels' own tile
routine (``_tile_logits``: norms, scale and bias in the epilogue, huge rows
scaled), and adds the tile's softplus sum to its running total (compensated,
so the order of a few thousand tile sums costs no accuracy). One partial per
program, summed once in fp64 on the host side: deterministic, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tile_math import _log1p_exp_neg_abs, _norms_and_logits, _tile_coords, _tile_logits


@triton.jit
def _row_chunk(x_ptr, offs_r, mask_r, k0, D, stride_xn, stride_xd, BLOCK_D: tl.constexpr):
    """Columns k0 + [0, BLOCK_D) of the rows offs_r in fp32, zero past D."""
    offs_d = k0 + tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (offs_d[None, :] < D)
    return tl.load(x_ptr + offs_r[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _inverse_norms_kernel(
    x_ptr, inv_ptr, N, D, stride_xn, stride_xd,
    NORMALIZE: tl.constexpr, EPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """inv[i] = 1 / max(|x_i|, EPS) for BLOCK_R rows (ones without NORMALIZE)."""
    pid = tl.program_id(0)
    offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = offs_r < N
    if NORMALIZE:
        sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            x = _row_chunk(x_ptr, offs_r, mask_r, k0, D, stride_xn, stride_xd, BLOCK_D)
            sq += tl.sum(x * x, axis=1)
        inv = 1.0 / tl.maximum(tl.sqrt(sq), EPS)
        overflowed = sq > 3.0e38  # inf; NaN rows stay NaN either way
        if tl.max(overflowed.to(tl.int32), axis=0) > 0:
            # Rows from ~1.8e19 on square past fp32: again, on the rows divided
            # by a power of two near their largest entry (exact). Underflow
            # needs no such pass: rows whose squares underflow are below eps.
            top = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_D):
                x = _row_chunk(x_ptr, offs_r, mask_r, k0, D, stride_xn, stride_xd, BLOCK_D)
                top = tl.maximum(top, tl.max(tl.abs(x), axis=1))
            exponent = (top.to(tl.int32, bitcast=True) >> 23) & 0xFF
            pow2 = (tl.maximum(exponent, 1) << 23).to(tl.float32, bitcast=True)
            sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_D):
                x = _row_chunk(x_ptr, offs_r, mask_r, k0, D, stride_xn, stride_xd,
                               BLOCK_D) / pow2[:, None]
                sq += tl.sum(x * x, axis=1)
            # 1 / max(|x|, eps) = (1 / max(|x| / pow2, eps / pow2)) / pow2.
            scaled = (1.0 / tl.maximum(tl.sqrt(sq), EPS / pow2)) / pow2
            inv = tl.where(overflowed, scaled, inv)
    else:
        inv = tl.full((BLOCK_R,), 1.0, tl.float32)
    tl.store(inv_ptr + offs_r, inv, mask=mask_r)


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
            _, logits = _tile_logits(
                x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y, scale, bias_ptr,
                stride_xn, stride_xd, stride_yn, stride_yd,
                HAS_BIAS, GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )
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
def _siglip_forward_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr, partial_ptr,
    M, K, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, NORMALIZE: tl.constexpr,
    GUARD_HUGE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """partial[program] = sum of softplus(-z L) over the program's tiles of
    the M x K logits (z = +1 on (i, i) with POSITIVES, else -1)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(K, BLOCK_N)
    scale = tl.load(scale_ptr).to(tl.float32)
    total = 0.0
    lost = 0.0  # Kahan compensation: a program adds thousands of tile sums
    for tile in range(pid, num_m * num_n, programs):
        rb, cb = _tile_coords(tile, num_m, num_n, GROUP_M)
        offs_m = (rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (cb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < K
        _, _, _, logits = _norms_and_logits(
            x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale, bias_ptr, offs_m, offs_n, mask_m, mask_n, D,
            stride_xn, stride_xd, stride_yn, stride_yd,
            HAS_BIAS, NORMALIZE, GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        # softplus(-zL) = max(-zL, 0) + log1p(exp(-|L|)): |zL| = |L| whatever z.
        soft, _ = _log1p_exp_neg_abs(logits)
        if POSITIVES:
            # A select per element, not a branch on diagonal tiles: a tile-sized
            # value merged from two branches stays live across them, and
            # that was the difference between spilling and not.
            on_diag = (tl.arange(0, BLOCK_M) + (rb * BLOCK_M - cb * BLOCK_N))[:, None] \
                == tl.arange(0, BLOCK_N)[None, :]
            hinge = tl.maximum(tl.where(on_diag, -logits, logits), 0.0)
        else:
            hinge = tl.maximum(logits, 0.0)
        # maximum() drops a NaN on GPUs; the log1p term keeps it.
        term = hinge + soft
        if ((rb + 1) * BLOCK_M > M) | ((cb + 1) * BLOCK_N > K):
            # Only edge tiles pay for the mask.
            term = tl.where(mask_m[:, None] & mask_n[None, :], term, 0.0)
        tile_sum = tl.sum(tl.sum(term, axis=1), axis=0)
        step = tile_sum - lost
        new_total = total + step
        lost = (new_total - total) - step
        total = new_total
    tl.store(partial_ptr + pid, total - lost)
