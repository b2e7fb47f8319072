// C++ CPU backend of the fused CLIP loss: the same tile arithmetic as the
// GPU kernels (tile_math.h), parallel over cores with OpenMP, O(N d) memory.
// Also its one direction over a rectangular block (row_forward /
// row_backward: hard negatives, one-direction InfoNCE, local_loss).
//
// Forward: row blocks are spread over threads; each computes its tiles' dot
// products, keeps its rows' running (max, sum) and merges the columns into a
// per-thread (max, sum) row of N (O(threads * N)); the partials are merged at
// the end. Backward recomputes the tiles twice: once by row blocks for dX^
// and the scale gradient, once by column blocks for dY^, so no thread ever
// shares an output row and no N x d partial exists per thread.
//
// The tile sweeps and the backward's two passes (backward_passes) are shared
// with the SigLIP backend, which includes this file: a loss supplies its
// per-logit gradient rule (ClipRule and RowRule here, SiglipRule there), as
// the CUDA backend's ClipPanel / SiglipPanel do for its panel kernel.
#include "cpu/clip_loss_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "clipfast/tile_math.h"

namespace clipfast {
namespace cpu {
namespace {

constexpr int64_t kBlockRows = 32;
constexpr int64_t kBlockCols = 128;

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Hot loops are compiled for AVX2+FMA and for the baseline, picked at run
// time (GCC function multi-versioning), so one build is fast and portable.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLIPFAST_DISPATCH __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLIPFAST_DISPATCH
#endif

template <typename T>
CLIPFAST_DISPATCH T dot(const T* a, const T* b, int64_t d) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < d; ++k) acc += a[k] * b[k];
  return acc;
}

// dst += w * src
template <typename T>
CLIPFAST_DISPATCH void axpy(T w, const T* src, T* dst, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) dst[k] += w * src[k];
}

// Row statistics of one tile row: merge max and sum exp(L - max) of
// values[0, width) into (running_max, running_sum). Split in a max pass and
// a sum pass so both vectorise; equal to lse_push over each value. A NaN is
// skipped by the max but makes the sum NaN, so it stays visible.
template <typename T>
CLIPFAST_DISPATCH void lse_push_row(const T* values, int64_t width, T& running_max, T& running_sum) {
  T m = running_max;
  for (int64_t j = 0; j < width; ++j) m = values[j] > m ? values[j] : m;
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < width; ++j) sum += exp(values[j] - m);
  running_sum = running_sum * exp(running_max - m) + sum;
  running_max = m;
}

// Column statistics of a tile: for each column j of the (rows x width) tile,
// merge its values into (col_max[j], col_sum[j]).
template <typename T>
CLIPFAST_DISPATCH void lse_push_cols(const T* tile, int64_t rows, int64_t width, T* col_max,
                                     T* col_sum, T* scratch_max) {
  for (int64_t j = 0; j < width; ++j) scratch_max[j] = col_max[j];
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = tile + i * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) scratch_max[j] = row[j] > scratch_max[j] ? row[j] : scratch_max[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    col_sum[j] = scratch_max[j] == -INFINITY ? col_sum[j] : col_sum[j] * exp(col_max[j] - scratch_max[j]);
    col_max[j] = scratch_max[j];
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = tile + i * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) col_sum[j] += exp(row[j] - col_max[j]);
  }
}

// Gradient weights of one tile row: out[j] = (P - [label]) + (Q - [label]).
template <typename T>
CLIPFAST_DISPATCH void grad_weights_row(const T* logits, int64_t width, T row_max, T row_logsum,
                                        const T* col_max, const T* col_logsum, int64_t label,
                                        T* out) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    out[j] = exp((logits[j] - row_max) - row_logsum) + exp((logits[j] - col_max[j]) - col_logsum[j]);
  }
  if (label >= 0 && label < width) {
    // The label's (P - 1) + (Q - 1), each difference exact (tile_math.h).
    out[label] = grad_weight<T>(logits[label], row_max, row_logsum, col_max[label],
                                col_logsum[label], true);
  }
}

template <typename T>
CLIPFAST_DISPATCH T max_abs(const T* a, int64_t d) {
  T top = T(0);
  for (int64_t k = 0; k < d; ++k) top = std::abs(a[k]) > top ? std::abs(a[k]) : top;
  return top;
}

// sum (a / scale)^2; scale is a power of two, so each quotient is exact.
template <typename T>
CLIPFAST_DISPATCH T scaled_sum_squares(const T* a, T scale, int64_t d) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < d; ++k) acc += (a[k] / scale) * (a[k] / scale);
  return acc;
}

}  // namespace

// Inverse norms without overflow in the squares: fp32 rows past ~1.8e19 (fp64
// past ~1e154) used to get an infinite norm and a NaN loss (tile_math.h).
template <typename T>
void inverse_norms(const T* x, int64_t n, int64_t d, bool normalize, T* inv) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T scale = pow2_scale(max_abs(x + i * d, d));
    inv[i] = inverse_norm<T>(scaled_sum_squares(x + i * d, scale, d), scale, normalize);
  }
}

namespace {

// Every square forward starts here; the backward reads what it leaves in p.
template <typename T>
void fill_inverse_norms(Problem<T>& p) {
  inverse_norms(p.x, p.n, p.d, p.normalize, p.inv_x);
  inverse_norms(p.y, p.cols, p.d, p.normalize, p.inv_y);
}

// The rows one tile's dot products read, and their inverse norms: the
// features themselves, or for a side of the tile holding a huge row (see
// tile_math.h) per-thread copies scaled by huge_row_scale, with the inverse
// norms divided by the same powers of two. Either way pair_logit gives the
// same cosines wherever the raw products stay in range; only a tile with a
// huge row pays for the copies.
template <typename T>
struct TileOperands {
  const T* x;      // row i0, rows d apart
  const T* y;      // row j0
  const T* inv_x;  // from i0
  const T* inv_y;  // from j0
  std::vector<T> x_copy, y_copy, inv_x_copy, inv_y_copy;

  void prepare(const Problem<T>& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    side(p.x, p.inv_x, i0, i1, p.d, x, inv_x, x_copy, inv_x_copy);
    side(p.y, p.inv_y, j0, j1, p.d, y, inv_y, y_copy, inv_y_copy);
  }

 private:
  static void side(const T* rows, const T* inv, int64_t r0, int64_t r1, int64_t d, const T*& out,
                   const T*& out_inv, std::vector<T>& copy, std::vector<T>& inv_copy) {
    out = rows + r0 * d;
    out_inv = inv + r0;
    if (std::none_of(inv + r0, inv + r1, [](T v) { return is_huge_row(v); })) return;
    copy.resize(static_cast<size_t>((r1 - r0) * d));
    inv_copy.resize(static_cast<size_t>(r1 - r0));
    for (int64_t r = r0; r < r1; ++r) {
      const T s = huge_row_scale(inv[r]);
      for (int64_t k = 0; k < d; ++k) copy[(r - r0) * d + k] = rows[r * d + k] * s;
      inv_copy[r - r0] = inv[r] / s;
    }
    out = copy.data();
    out_inv = inv_copy.data();
  }
};

// Logits of the tile rows [i0, i1) x columns [j0, j1), row-major in `tile`,
// with their cosines in `cosines`; `ops` prepared for this tile.
template <typename T>
void tile_logits(const Problem<T>& p, const TileOperands<T>& ops, int64_t i0, int64_t i1,
                 int64_t j0, int64_t j1, T* tile, T* cosines) {
  const int64_t width = j1 - j0;
  for (int64_t i = i0; i < i1; ++i) {
    const T* xi = ops.x + (i - i0) * p.d;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t at = (i - i0) * width + (j - j0);
      tile[at] = pair_logit<T>(dot(xi, ops.y + (j - j0) * p.d, p.d), ops.inv_x[i - i0],
                               ops.inv_y[j - j0], p.scale, p.bias, &cosines[at]);
    }
  }
}

// One thread's tile: logits and cosines (row-major, rows `width` apart), a
// row of scratch for whatever a sweep derives per tile row (weights, loss
// terms, column maxima), and the operands the tile was computed from.
template <typename T>
struct TileWork {
  std::vector<T> logits = std::vector<T>(kBlockRows * kBlockCols);
  std::vector<T> cosines = std::vector<T>(kBlockRows * kBlockCols);
  std::vector<T> row = std::vector<T>(kBlockCols);
  TileOperands<T> ops;

  // Computes rows [i0, i1) x columns [j0, j1); returns the width.
  int64_t compute(const Problem<T>& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    ops.prepare(p, i0, i1, j0, j1);
    tile_logits(p, ops, i0, i1, j0, j1, logits.data(), cosines.data());
    return j1 - j0;
  }
};

int64_t row_blocks(int64_t n) { return (n + kBlockRows - 1) / kBlockRows; }

// Per-row-block partials are summed in block order, never in thread order:
// reproducible whatever the schedule.
double sum_in_order(const std::vector<double>& parts) {
  double total = 0.0;
  for (double part : parts) total += part;
  return total;
}

}  // namespace

template <typename T>
double forward(Problem<T>& p, Stats<T>& s) {
  const int64_t n = p.n;
  fill_inverse_norms(p);
  const int threads = num_threads();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> part_max(static_cast<size_t>(threads) * n, neg_inf);
  std::vector<T> part_sum(static_cast<size_t>(threads) * n, T(0));

#pragma omp parallel
  {
    T* my_max = part_max.data() + static_cast<int64_t>(thread_id()) * n;
    T* my_sum = part_sum.data() + static_cast<int64_t>(thread_id()) * n;
    TileWork<T> work;
    // Static: each thread's column partials always cover the same row blocks,
    // so results are bitwise reproducible (gradcheck's reentrancy check).
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
      const int64_t i1 = std::min(n, i0 + kBlockRows);
      T row_max[kBlockRows], row_sum[kBlockRows];
      std::fill(row_max, row_max + kBlockRows, neg_inf);
      std::fill(row_sum, row_sum + kBlockRows, T(0));
      for (int64_t j0 = 0; j0 < n; j0 += kBlockCols) {
        const int64_t j1 = std::min(n, j0 + kBlockCols), width = work.compute(p, i0, i1, j0, j1);
        for (int64_t i = i0; i < i1; ++i) {
          const T* row = work.logits.data() + (i - i0) * width;
          lse_push_row(row, width, row_max[i - i0], row_sum[i - i0]);
          if (i >= j0 && i < j1) s.diag[i] = row[i - j0];
        }
        lse_push_cols(work.logits.data(), i1 - i0, width, my_max + j0, my_sum + j0,
                      work.row.data());
      }
      for (int64_t i = i0; i < i1; ++i) {
        s.row_max[i] = row_max[i - i0];
        s.row_logsum[i] = log(row_sum[i - i0]);
      }
    }
  }

#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    T m = neg_inf, sum = T(0);
    for (int t = 0; t < threads; ++t) lse_merge(m, sum, part_max[t * n + j], part_sum[t * n + j]);
    s.col_max[j] = m;
    s.col_logsum[j] = log(sum);
  }

  // In index order (an OpenMP reduction combines threads in any order).
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    total += static_cast<double>((s.row_max[i] - s.diag[i]) + s.row_logsum[i]);
    total += static_cast<double>((s.col_max[i] - s.diag[i]) + s.col_logsum[i]);
  }
  return total / (2.0 * static_cast<double>(n));
}

namespace {

// out_row = factor * (g - x^ <x^, g>) * inv_norm (the normalisation backward),
// or factor * g without normalisation. g is overwritten.
template <typename T>
void finish_row(T* g, const T* features, T inv_norm, T factor, bool normalize, int64_t d) {
  if (!normalize) {
    for (int64_t k = 0; k < d; ++k) g[k] *= factor;
    return;
  }
  T radial = T(0);
  if (!norm_is_clamped(inv_norm)) {
    for (int64_t k = 0; k < d; ++k) radial += g[k] * factor * (features[k] * inv_norm);
  }
  for (int64_t k = 0; k < d; ++k) {
    g[k] = (g[k] * factor - features[k] * inv_norm * radial) * inv_norm;
  }
}

// The scalar sums of a backward, over all pairs: sum w cos (the scale
// gradient) and sum w (the bias gradient; a softmax loss leaves it 0).
struct WeightSums {
  double weight_cosine = 0.0;
  double weight = 0.0;
};

// The backward of a loss given by its gradient rule, w_ij = c dloss/dL_ij for
// a constant c (2N for CLIP, N for SigLIP) that factor = grad_loss scale / c
// multiplies back out in the finish:
//   rule.row_weights(logits, width, i, j0, out): w of tile row i, columns j0..
//   rule.add_sums(weights, cosines, width, sums): adds that row to the sums.
// Pass 1, by row blocks: dX^ rows (complete within one thread) and the sums,
// one partial per row block; pass 2, by column blocks: dY^ rows, recomputing
// the same tiles. Returns the sums (zeros unless need_sums). The block is
// p.n rows (of x) by p.cols columns (rows of y).
template <typename T, typename Rule>
WeightSums backward_passes(const Problem<T>& p, const Rule& rule, T factor, T* grad_x, T* grad_y,
                           bool need_x, bool need_y, bool need_sums) {
  const int64_t n = p.n, cols = p.cols, d = p.d;
  std::vector<double> block_weight_cosine(static_cast<size_t>(row_blocks(n)), 0.0);
  std::vector<double> block_weight(static_cast<size_t>(row_blocks(n)), 0.0);

  if (need_x || need_sums) {
#pragma omp parallel
    {
      TileWork<T> work;
#pragma omp for schedule(dynamic)
      for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
        const int64_t i1 = std::min(n, i0 + kBlockRows);
        if (need_x) std::fill(grad_x + i0 * d, grad_x + i1 * d, T(0));
        WeightSums sums;
        T* weights = work.row.data();
        for (int64_t j0 = 0; j0 < cols; j0 += kBlockCols) {
          const int64_t j1 = std::min(cols, j0 + kBlockCols);
          const int64_t width = work.compute(p, i0, i1, j0, j1);
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t at = (i - i0) * width;
            rule.row_weights(work.logits.data() + at, width, i, j0, weights);
            if (need_sums) rule.add_sums(weights, work.cosines.data() + at, width, sums);
            if (need_x) {
              T* gx = grad_x + i * d;
              // w inv_y y = (w inv_y / s) (y s): scaled huge rows keep every
              // factor in range.
              for (int64_t j = j0; j < j1; ++j)
                axpy(weights[j - j0] * work.ops.inv_y[j - j0], work.ops.y + (j - j0) * d, gx, d);
            }
          }
        }
        block_weight_cosine[i0 / kBlockRows] = sums.weight_cosine;
        block_weight[i0 / kBlockRows] = sums.weight;
        if (need_x) {
          for (int64_t i = i0; i < i1; ++i)
            finish_row(grad_x + i * d, p.x + i * d, p.inv_x[i], factor, p.normalize, d);
        }
      }
    }
  }

  if (need_y) {
#pragma omp parallel
    {
      TileWork<T> work;
#pragma omp for schedule(dynamic)
      for (int64_t j0 = 0; j0 < cols; j0 += kBlockCols) {
        const int64_t j1 = std::min(cols, j0 + kBlockCols), width = j1 - j0;
        std::fill(grad_y + j0 * d, grad_y + j1 * d, T(0));
        T* weights = work.row.data();
        for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
          const int64_t i1 = std::min(n, i0 + kBlockRows);
          work.compute(p, i0, i1, j0, j1);
          for (int64_t i = i0; i < i1; ++i) {
            rule.row_weights(work.logits.data() + (i - i0) * width, width, i, j0, weights);
            const T* xi = work.ops.x + (i - i0) * d;
            for (int64_t j = j0; j < j1; ++j)
              axpy(weights[j - j0] * work.ops.inv_x[i - i0], xi, grad_y + j * d, d);
          }
        }
        for (int64_t j = j0; j < j1; ++j)
          finish_row(grad_y + j * d, p.y + j * d, p.inv_y[j], factor, p.normalize, d);
      }
    }
  }
  return WeightSums{sum_in_order(block_weight_cosine), sum_in_order(block_weight)};
}

// Per tile row in T, then fp64 across rows: the CLIP backward's summation
// order from the start, kept so its scale gradient stays bit for bit. (A
// softmax loss's bias sum is the exact zero the Python side returns.)
template <typename T>
void add_softmax_scale_sum(const T* weights, const T* cosines, int64_t width, WeightSums& sums) {
  T row_scale_grad = T(0);
  for (int64_t j = 0; j < width; ++j) row_scale_grad += weights[j] * cosines[j];
  sums.weight_cosine += static_cast<double>(row_scale_grad);
}

// CLIP's rule: w = 2N dloss/dL = (P - [label]) + (Q - [label]) from the
// forward's softmax statistics.
template <typename T>
struct ClipRule {
  Stats<T> s;

  void row_weights(const T* logits, int64_t width, int64_t i, int64_t j0, T* out) const {
    grad_weights_row(logits, width, s.row_max[i], s.row_logsum[i], s.col_max + j0,
                     s.col_logsum + j0, i - j0, out);
  }

  void add_sums(const T* weights, const T* cosines, int64_t width, WeightSums& sums) const {
    add_softmax_scale_sum(weights, cosines, width, sums);
  }
};

}  // namespace

template <typename T>
T backward(const Problem<T>& p, const Stats<T>& s, T grad_loss, T* grad_x, T* grad_y,
           bool need_x, bool need_y, bool need_scale) {
  const T coef = grad_loss / T(2 * p.n);
  const WeightSums sums = backward_passes(p, ClipRule<T>{s}, coef * p.scale, grad_x, grad_y,
                                          need_x, need_y, need_scale);
  return static_cast<T>(sums.weight_cosine) * coef;
}

template double forward<float>(Problem<float>&, Stats<float>&);
template double forward<double>(Problem<double>&, Stats<double>&);
template float backward<float>(const Problem<float>&, const Stats<float>&, float, float*, float*,
                               bool, bool, bool);
template double backward<double>(const Problem<double>&, const Stats<double>&, double, double*,
                                 double*, bool, bool, bool);

// --------------------------------------------------------------------------- //
// The row loss: one direction over an n x cols block, labels at i + offset.
// --------------------------------------------------------------------------- //

template <typename T>
void row_forward(const Problem<T>& p, int64_t label_offset, T* row_max, T* row_sum, T* diag) {
  const int64_t n = p.n, cols = p.cols;
  const T neg_inf = -std::numeric_limits<T>::infinity();
#pragma omp parallel
  {
    TileWork<T> work;
    // Each row's statistics come from its own tiles in column order: the
    // same bits whatever the schedule or thread count.
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
      const int64_t i1 = std::min(n, i0 + kBlockRows);
      T block_max[kBlockRows], block_sum[kBlockRows];
      std::fill(block_max, block_max + kBlockRows, neg_inf);
      std::fill(block_sum, block_sum + kBlockRows, T(0));
      for (int64_t j0 = 0; j0 < cols; j0 += kBlockCols) {
        const int64_t j1 = std::min(cols, j0 + kBlockCols);
        const int64_t width = work.compute(p, i0, i1, j0, j1);
        for (int64_t i = i0; i < i1; ++i) {
          const T* row = work.logits.data() + (i - i0) * width;
          lse_push_row(row, width, block_max[i - i0], block_sum[i - i0]);
          const int64_t label = i + label_offset;
          if (label >= j0 && label < j1) diag[i] = row[label - j0];
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        row_max[i] = block_max[i - i0];
        row_sum[i] = block_sum[i - i0];
      }
    }
  }
}

namespace {

// Weights of one tile row: out[j] = P_j - [j == label], P = exp((L - max) -
// logsum). The label's P - 1 is expm1 of that exponent, which skips
// rounding P to ulp(1) before the cancelling subtraction: in a confident row
// P is near 1 and the weight small.
template <typename T>
CLIPFAST_DISPATCH void row_grad_weights(const T* logits, int64_t width, T row_max, T row_logsum,
                                        int64_t label, T* out) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) out[j] = exp((logits[j] - row_max) - row_logsum);
  if (label >= 0 && label < width) out[label] = std::expm1((logits[label] - row_max) - row_logsum);
}

// The row loss's rule: w = dloss/dL / coef = P - [label] from the rows'
// complete statistics (the extra logits, if any, are already merged in).
template <typename T>
struct RowRule {
  const T* row_max;
  const T* row_logsum;
  int64_t label_offset;

  void row_weights(const T* logits, int64_t width, int64_t i, int64_t j0, T* out) const {
    row_grad_weights(logits, width, row_max[i], row_logsum[i], i + label_offset - j0, out);
  }

  void add_sums(const T* weights, const T* cosines, int64_t width, WeightSums& sums) const {
    add_softmax_scale_sum(weights, cosines, width, sums);
  }
};

}  // namespace

template <typename T>
T row_backward(const Problem<T>& p, int64_t label_offset, const T* row_max, const T* row_logsum,
               T coef, T* grad_x, T* grad_y, bool need_x, bool need_y, bool need_scale) {
  const WeightSums sums = backward_passes(p, RowRule<T>{row_max, row_logsum, label_offset},
                                          coef * p.scale, grad_x, grad_y, need_x, need_y,
                                          need_scale);
  return static_cast<T>(sums.weight_cosine) * coef;
}

template void inverse_norms<float>(const float*, int64_t, int64_t, bool, float*);
template void inverse_norms<double>(const double*, int64_t, int64_t, bool, double*);
template void row_forward<float>(const Problem<float>&, int64_t, float*, float*, float*);
template void row_forward<double>(const Problem<double>&, int64_t, double*, double*, double*);
template float row_backward<float>(const Problem<float>&, int64_t, const float*, const float*,
                                   float, float*, float*, bool, bool, bool);
template double row_backward<double>(const Problem<double>&, int64_t, const double*,
                                     const double*, double, double*, double*, bool, bool, bool);

}  // namespace cpu
}  // namespace clipfast
