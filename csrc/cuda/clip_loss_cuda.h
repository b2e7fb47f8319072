// CUDA backend of the fused CLIP loss (see clip_loss_cuda.cu). Plain pointers:
// the Python side allocates every buffer with torch and owns it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace clipfast {
namespace cuda {

template <typename In>
struct Params {
  const In* x;  // (n, d) row-major image features
  const In* y;  // (n, d) row-major text features
  int64_t n;
  int64_t d;
  float scale;
  float bias;  // 0 without a bias: adding 0 is exact
  bool normalize;
  float* inv_x;  // written by forward, read by backward
  float* inv_y;
};

struct Stats {  // fp32, n each
  float* row_max;
  float* row_logsum;
  float* col_max;
  float* col_logsum;
  float* diag;
};

struct Workspace {  // forward's partials; col_* start at -inf / 0
  int64_t row_splits;
  int64_t col_splits;
  float* row_max_part;  // (col_splits, n)
  float* row_sum_part;
  float* col_max_part;  // (row_splits, n)
  float* col_sum_part;
};

template <typename In>
void forward(const Params<In>& p, const Stats& s, const Workspace& w, cudaStream_t stream);

// acc_x / acc_y: zeroed fp32 (n, d) accumulators; scale_grad_part: one float
// per 64-row block (sum * factor / scale is dL/dscale). grad_x / grad_y may be
// null when not needed.
template <typename In>
void backward(const Params<In>& p, const Stats& s, float factor, float* acc_x, float* acc_y,
              float* scale_grad_part, In* grad_x, In* grad_y, cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
