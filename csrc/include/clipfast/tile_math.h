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
using std::log;
using std::sqrt;
#endif

// eps of F.normalize.
constexpr double kNormEps = 1e-12;

// 1 / max(|x|, eps) from the sum of squares (1 when not normalising).
template <typename T>
CLIPFAST_HD T inverse_norm(T sum_squares, bool normalize) {
  return normalize ? T(1) / fmax(sqrt(sum_squares), T(kNormEps)) : T(1);
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
