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

// fp16/bf16 run tensor-core tiles (tensor_core_tiles.cu) with fp32
// accumulation; fp32 runs them in TF32 when `tf32`, else IEEE fp32 SIMT
// tiles (like torch's matmul without allow_tf32).
template <typename In>
void forward(const Params<In>& p, const Stats& s, const Workspace& w, bool tf32,
             cudaStream_t stream);

// SIMT backward (IEEE fp32 arithmetic; the backward of fp32 without TF32).
// acc_x / acc_y: zeroed fp32 (n, d) accumulators; scale_grad_part: one float
// per 64-row block of unscaled sums sum_ij (P + Q - 2[i==j]) * cos_ij.
// Gradients are scaled by factor * (*coef) with coef read on the device.
// grad_x / grad_y may be null when not needed.
template <typename In>
void backward(const Params<In>& p, const Stats& s, float factor, const float* coef,
              float* acc_x, float* acc_y, float* scale_grad_part, In* grad_x, In* grad_y,
              cudaStream_t stream);

// Buffers of the strip backward (fp16/bf16, and fp32 in TF32). A strip is `strip` rows of X (or
// columns of Y, for dY^) against all of the other side.
template <typename In>
struct StripWorkspace {
  int64_t strip;         // rows per strip, a multiple of kStripAlign
  int64_t ld;            // row length of g_strip: n rounded up to kStripAlign
  int64_t k_splits;      // split-K factor of the strip GEMM
  In* g_strip;           // (strip, ld) gradient weights of one strip
  float* c_strip;        // (k_splits, strip, d) fp32 partial products
  float* scale_part;     // (strip / 128) * (ld / 64) per-tile partial sums
  float* scale_acc;      // one unscaled scale-gradient sum per strip
};
constexpr int64_t kStripAlign = 128;

// Tensor-core backward by strips: for each strip, a kernel recomputes the
// strip's logits and writes G (P + Q - 2[i==j], in In) once, then a GEMM kernel
// multiplies it by the other side's unit rows with fp32 accumulation over all
// n, and the normalisation backward finishes the strip's rows. Extra memory is
// one strip of G plus O(strip * d): no n x d accumulator.
template <typename In>
void backward_strips(const Params<In>& p, const Stats& s, float factor, const float* coef,
                     const StripWorkspace<In>& w, bool need_scale, In* grad_x, In* grad_y,
                     cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
