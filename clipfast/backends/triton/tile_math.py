"""The tile math of the Triton kernels, in one place: ``@triton.jit`` helpers
that every kernel of both losses inlines.

One copy matters beyond tidiness: the backward passes recompute the
forward's logits tile by tile, and only the same code on the same tile grid
rounds them bit for bit alike (see ``_tile_logits``). Here: the
similarity tile and its huge-row guard, the powers of two of the folded
gradient panel (``_fold_shifts``), SigLIP's softplus and sigmoid pieces,
inverse-norm loads, grouped tile order and the split accumulator's load.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    # Huge rows only (SCALED) are rare: that loop runs unpipelined, so that
    # its registers do not add to the common loop's.
    for k0 in tl.range(0, D, BLOCK_K, num_stages=1 if SCALED else None):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        x = tl.load(x_rows + offs_k[None, :] * stride_xd,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Y is read as a (BLOCK_K, BLOCK_N) transposed view: no tl.trans needed.
        y_t = tl.load(y_rows + offs_k[:, None] * stride_yd,
                      mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SCALED:
            # Powers of two: exact in the dot dtype itself (bf16 keeps fp32's
            # exponent range), and no fp32 copy of the operands.
            x = x.to(DOT_DTYPE) * scale_x[:, None].to(DOT_DTYPE)
            y_t = y_t.to(DOT_DTYPE) * scale_y[None, :].to(DOT_DTYPE)
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
def _tile_logits(
    x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y, scale, bias_ptr,
    stride_xn, stride_xd, stride_yn, stride_yd,
    HAS_BIAS: tl.constexpr, GUARD_HUGE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(cosines, logits) of one tile, from the rows and their inverse norms.

    Every kernel, forward and backward, takes its logits from here, on the
    same tile grid, so the backward passes recompute bit-identical logits:
    where |L| is large and the softmax one-hot, an ulp of difference against
    the saved max would show up as a spurious gradient.

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
    cosine = acc * inv_x[:, None] * inv_y[None, :]
    logits = cosine * scale
    if HAS_BIAS:
        logits += tl.load(bias_ptr).to(tl.float32)
    return cosine, logits


@triton.jit
def _norms_and_logits(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale, bias_ptr, offs_m, offs_n, mask_m, mask_n, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, GUARD_HUGE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(inv_x, inv_y, cosines, logits) of one tile: ``_tile_logits`` with the
    inverse norms loaded (``_inverse_norms_of``), for the kernels that read
    each tile's rows afresh."""
    inv_x = _inverse_norms_of(inv_x_ptr, offs_m, mask_m, NORMALIZE, BLOCK_M)
    inv_y = _inverse_norms_of(inv_y_ptr, offs_n, mask_n, NORMALIZE, BLOCK_N)
    cosine, logits = _tile_logits(
        x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y, scale, bias_ptr,
        stride_xn, stride_xd, stride_yn, stride_yd,
        HAS_BIAS, GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    return inv_x, inv_y, cosine, logits


@triton.jit
def _panel_tile(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr,
    M, K, D, row_start, col_start, panel_rows, panel_cols,
    stride_xn, stride_xd, stride_yn, stride_yd,
    HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, GUARD_HUGE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """This program's tile of a gradient panel, recomputed as the forward
    computed it. The panel covers rows row_start.. of X and columns
    col_start.. of Y, at most panel_rows x panel_cols.

    Returns (pid_m, pid_n, local_m, local_n, offs_m, offs_n, mask_m, mask_n,
    inv_x, inv_y, cosines, logits): the tile's program ids, its indices in
    the panel (local) and in the block (int64 offs) with their masks, then
    what ``_norms_and_logits`` returns. Both losses' gradient kernels start
    here, so their panels cover the block alike.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (row_start + local_m).to(tl.int64)
    offs_n = (col_start + local_n).to(tl.int64)
    mask_m = (local_m < panel_rows) & (offs_m < M)
    mask_n = (local_n < panel_cols) & (offs_n < K)

    scale = tl.load(scale_ptr).to(tl.float32)
    inv_x, inv_y, cosine, logits = _norms_and_logits(
        x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale, bias_ptr, offs_m, offs_n, mask_m, mask_n, D,
        stride_xn, stride_xd, stride_yn, stride_yd,
        HAS_BIAS, NORMALIZE, GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    return pid_m, pid_n, local_m, local_n, offs_m, offs_n, mask_m, mask_n, inv_x, inv_y, cosine, logits


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
def _fold_inv_norms(grad, inv_x, inv_y, inv_range_ptr):
    """G_ij (inv_x_i shift_x) (inv_y_j shift_y): a gradient tile as the folded
    panel holds it (``_fold_shifts``), so that the panel products can read
    raw feature rows."""
    shift_x, shift_y, _, _ = _fold_shifts(inv_range_ptr)
    return grad * (inv_x * shift_x)[:, None] * (inv_y * shift_y)[None, :]


@triton.jit
def _load_accumulator(acc_ptr, acc_lo_ptr, offs, mask, SPLIT_ACC: tl.constexpr):
    """An accumulator's values in fp32: an fp32 buffer's own, or (SPLIT_ACC)
    the 24-bit floats held as an int16 high plane and a uint8 low plane
    (see ``_accumulate_product_tile``, which writes them)."""
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
def _log1p_exp_neg_abs(logits):
    """(log1p(exp(-|L|)), exp(-|L|)), within 1.5 ulps of log1p of the e
    computed, in 11 instructions and one MUFU operation.

    log1p(e) = e g(e) for e in [0, 1], with g a degree-9 minimax fit of
    log1p(e) / e (relative error 4.7e-9; g(0) = 1 exactly). The forward's
    epilogue is as long as its main loop at d = 768, so this matters: a
    general log of 1 + e (libdevice's, ~25 instructions) would also round
    away e's low bits, and 2 atanh(e / (2 + e)) pays ~10 instructions for
    the range checks of an IEEE-style division. Explicit FMAs: the kernels
    are compiled without contraction so that the logits round alike in
    forward and backward, which this polynomial never feeds.
    """
    e = tl.exp2(tl.abs(logits) * -1.4426950408889634)
    g = tl.fma(e, -0.003244024934247136, 0.01985146291553974)
    g = tl.fma(g, e, -0.05695953965187073)
    g = tl.fma(g, e, 0.10603655874729156)
    g = tl.fma(g, e, -0.15305593609809875)
    g = tl.fma(g, e, 0.1967594027519226)
    g = tl.fma(g, e, -0.24954134225845337)
    g = tl.fma(g, e, 0.3332996368408203)
    g = tl.fma(g, e, -0.4999990165233612)
    g = tl.fma(g, e, 1.0)
    return e * g, e


@triton.jit
def _reciprocal_1_2(v):
    """1 / v for v in [1, 2] to about an ulp: rsqrt squared (one MUFU
    operation; Triton's ``1 / v`` is a division with range checks, ~10
    instructions) and one Newton step."""
    r = tl.math.rsqrt(v)
    r = r * r
    return tl.fma(r, tl.fma(-v, r, 1.0), r)


@triton.jit
def _inverse_norms_of(inv_ptr, offs, mask, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """The rows' inverse norms, or constant ones without normalisation: the
    compiler then drops the multiplications by them, and a wide tile saves
    the registers of a per-column vector."""
    if NORMALIZE:
        inv = tl.load(inv_ptr + offs, mask=mask, other=0.0)
    else:
        inv = tl.full((BLOCK,), 1.0, tl.float32)
    return inv


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column block) of a tile index in grouped order: the
    programs running at once cover GROUP_M row blocks and a band of column
    blocks, so each operand block they read serves several of them from L2
    (row-major order would stream all of X past every column block)."""
    group_size = GROUP_M * num_n
    first_m = (tile // group_size) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group_size) % group_m, (tile % group_size) // group_m


@triton.jit
def _rounded_for_store(value, RTNE_BF16: tl.constexpr):
    """fp32 ``value``, pre-rounded to the nearest bfloat16 (ties to even) with
    RTNE_BF16: Triton's interpreter converts fp32 to bf16 by truncation (a
    GPU rounds to nearest), so a bf16 store there truncates what this already
    rounded, exactly. The carry into the exponent is the rounding up."""
    if RTNE_BF16:
        bits = value.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        value = (bits & -65536).to(tl.float32, bitcast=True)
    return value
