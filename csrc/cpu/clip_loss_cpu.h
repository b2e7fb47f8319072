// C++ CPU backend of the fused CLIP loss (see clip_loss_cpu.cpp).
#pragma once

#include <cstdint>

namespace clipfast {
namespace cpu {

// Inputs: row-major contiguous (n, d) and (cols, d) features; inv_x / inv_y
// are outputs of forward (inverse norms) and inputs of backward. The CLIP and
// SigLIP losses are square (cols == n); the row loss's blocks need not be.
template <typename T>
struct Problem {
  const T* x;
  const T* y;
  int64_t n;     // rows of x: the logits' rows
  int64_t cols;  // rows of y: the logits' columns
  int64_t d;
  T scale;
  T bias;  // 0 without a bias: adding 0 is exact
  bool normalize;
  T* inv_x;
  T* inv_y;
};

// What survives from forward to backward: O(n) per direction.
template <typename T>
struct Stats {
  T* row_max;
  T* row_logsum;
  T* col_max;
  T* col_logsum;
  T* diag;
};

// Fills p.inv_x, p.inv_y and the stats; returns the loss.
template <typename T>
double forward(Problem<T>& p, Stats<T>& s);

// Writes dL/dx, dL/dy (times grad_loss) where asked; returns dL/dscale when
// need_scale (else 0).
template <typename T>
T backward(const Problem<T>& p, const Stats<T>& s, T grad_loss, T* grad_x, T* grad_y,
           bool need_x, bool need_y, bool need_scale);

// One direction of the CLIP loss over an n x cols block (hard negatives,
// one-direction InfoNCE, local_loss): row i's label is column i +
// label_offset, which the caller keeps in [0, cols).

// Inverse norms of one side: 1 / max(|row|, eps) (all ones without
// normalize), overflow-safe as forward's.
template <typename T>
void inverse_norms(const T* features, int64_t rows, int64_t d, bool normalize, T* inv);

// Per row of L = s X^ Y^T + b, from the inverse norms in p: row_max, row_sum
// = sum_j exp(L_ij - row_max) and diag = L_i,i+label_offset. No column
// statistics: the row loss's backward needs none.
template <typename T>
void row_forward(const Problem<T>& p, int64_t label_offset, T* row_max, T* row_sum, T* diag);

// Gradients of coef x sum_i CE(row i): dL/dx, dL/dy where asked, from the
// rows' complete (max, log-sum) (extra per-row logits already merged in);
// returns dL/dscale when need_scale (else 0).
template <typename T>
T row_backward(const Problem<T>& p, int64_t label_offset, const T* row_max, const T* row_logsum,
               T coef, T* grad_x, T* grad_y, bool need_x, bool need_y, bool need_scale);

}  // namespace cpu
}  // namespace clipfast
