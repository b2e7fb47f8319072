// C++ CPU backend of the fused CLIP loss (see clip_loss_cpu.cpp).
#pragma once

#include <cstdint>

namespace clipfast {
namespace cpu {

// Inputs: row-major contiguous (n, d) features; inv_x / inv_y are outputs of
// forward (inverse norms) and inputs of backward.
template <typename T>
struct Problem {
  const T* x;
  const T* y;
  int64_t n;
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

}  // namespace cpu
}  // namespace clipfast
