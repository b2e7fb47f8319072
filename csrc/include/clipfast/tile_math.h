// Per-element arithmetic of the fused CLIP loss, shared by the C++ CPU backend
// and the CUDA kernels: the same online log-sum-exp, gradient weights and
// normalisation on both sides, so a machine without a GPU exercises the math
// the GPU runs.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define CLIPFAST_HD __host__ __device__ __forceinline__
#else
#define CLIPFAST_HD inline
#endif

namespace clipfast {

#if !defined(__CUDACC__)
using std::exp;
using std::fmax;
using std::frexp;
using std::isfinite;
using std::ldexp;
using std::log;
using std::sqrt;
#endif

// eps of F.normalize.
constexpr double kNormEps = 1e-12;

// A power of two within a factor 2 of `top` (a row's largest |entry|); 1 for
// a zero, infinite or NaN top. Dividing the row by it is exact, so its sum of
// squares can neither overflow (fp32 squares pass 3.4e38 from 1.8e19 on) nor
// underflow, and in range the norm comes out bit for bit as without it.
template <typename T>
CLIPFAST_HD T pow2_scale(T top) {
  if (!(top > T(0)) || !isfinite(top)) return T(1);
  int exponent;
  frexp(top, &exponent);  // top = m * 2^exponent, 0.5 <= m < 1
  return ldexp(T(1), exponent - 1);
}

// 1 / max(|x|, eps) (1 when not normalising) from the sum of squares of
// x / scale, scale = pow2_scale(max |x|): (1 / max(|x| / scale, eps / scale))
// / scale, with no intermediate past the range even where |x| itself is
// (every entry near FLT_MAX).
template <typename T>
CLIPFAST_HD T inverse_norm(T scaled_sum_squares, T scale, bool normalize) {
  return normalize ? (T(1) / fmax(sqrt(scaled_sum_squares), T(kNormEps) / scale)) / scale : T(1);
}

// Rows of norm past 2^32 (inverse norm below 2^-32) are "huge": two of them
// can overflow a dot product's accumulator (fp32: |x| |y| > 3.4e38), so tiles
// holding one compute their dot products on rows scaled by huge_row_scale.
// Below it, raw dot products stay under 2^64 and tiles are computed as ever.
constexpr double kHugeRowInvNorm = 1.0 / 4294967296.0;

template <typename T>
CLIPFAST_HD bool is_huge_row(T inv_norm) {
  return inv_norm < T(kHugeRowInvNorm);
}

// s, a power of two with inv_norm / s in [1, 2) for a huge row (x s then has
// a norm in (0.5, 1]), 1 for any other row. cosine = <x s, y t> (inv_x / s)
// (inv_y / t) is the cosine computed from raw rows, rounding for rounding, as
// far as that one's arithmetic stays in range.
template <typename T>
CLIPFAST_HD T huge_row_scale(T inv_norm) {
  if (!is_huge_row(inv_norm)) return T(1);
  int exponent;
  frexp(inv_norm, &exponent);  // inv_norm = m * 2^exponent, 0.5 <= m < 1
  return ldexp(T(1), exponent - 1);
}

// The inverse norm of a row as its tiles' dot products see it: inv_norm /
// huge_row_scale(inv_norm), exact. A side of a tile is scaled whenever it
// holds a huge row, and other rows' scale is 1, so this is right whichever
// way the tile went.
template <typename T>
CLIPFAST_HD T tile_inv_norm(T inv_norm) {
  return is_huge_row(inv_norm) ? inv_norm / huge_row_scale(inv_norm) : inv_norm;
}

// True when |x| < eps: the clamp is active and x^ = x / eps has Jacobian
// I / eps, so the normalisation backward drops its radial term.
template <typename T>
CLIPFAST_HD bool norm_is_clamped(T inv_norm) {
  return inv_norm * T(kNormEps) >= T(1) - T(1e-6);
}

// Logit of one pair from its raw dot product. Every pass computes it in this
// order, so a recomputed logit equals the forward's bit for bit.
template <typename T>
CLIPFAST_HD T pair_logit(T dot, T inv_x, T inv_y, T scale, T bias, T* cosine) {
  const T c = dot * inv_x * inv_y;
  *cosine = c;
  return c * scale + bias;
}

// Online log-sum-exp: push one value into (max, sum exp(v - max)). A NaN
// value makes the sum NaN, so NaN is never hidden behind a finite loss; -inf
// (a masked entry) adds nothing, and must not meet a -inf max: exp(-inf + inf)
// would be NaN.
template <typename T>
CLIPFAST_HD void lse_push(T& running_max, T& running_sum, T value) {
  if (value == -INFINITY) return;
  if (value > running_max) {
    running_sum = running_sum * exp(running_max - value) + T(1);
    running_max = value;
  } else {
    running_sum += exp(value - running_max);
  }
}

// (max, sum exp(v - max)) of the `count` values line[0], line[stride], ...:
// a max pass, then an exp-sum pass, so every exp is independent (lse_push
// rescales whenever the max moves, a data-dependent branch per value). A NaN
// becomes the max and makes the sum NaN; a wholly masked (-inf) line gives
// (-inf, 0), as lse_push does.
template <typename T>
CLIPFAST_HD void lse_of_line(const T* line, int count, int stride, T& line_max, T& line_sum) {
  T m = -INFINITY;
  for (int i = 0; i < count; ++i) {
    const T v = line[i * stride];
    m = (v > m || v != v) ? v : m;
  }
  T s = T(0);
  if (m != -INFINITY) {
    for (int i = 0; i < count; ++i) s += exp(line[i * stride] - m);
  }
  line_max = m;
  line_sum = s;
}

// Merge two (max, sum) partials (the cross-tile merge).
template <typename T>
CLIPFAST_HD void lse_merge(T& running_max, T& running_sum, T other_max, T other_sum) {
  const T m = running_max > other_max ? running_max : other_max;
  if (m == -INFINITY) return;  // both empty
  running_sum = running_sum * exp(running_max - m) + other_sum * exp(other_max - m);
  running_max = m;
}

// dLoss/dL_ij * 2N: (P - [label]) + (Q - [label]), with (L - max) taken first
// and each "- 1" applied to its own probability, both exact near the max.
template <typename T>
CLIPFAST_HD T grad_weight(T logit, T row_max, T row_logsum, T col_max, T col_logsum, bool label) {
  T p = exp((logit - row_max) - row_logsum);
  T q = exp((logit - col_max) - col_logsum);
  if (label) {
    p -= T(1);
    q -= T(1);
  }
  return p + q;
}

}  // namespace clipfast
