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

// Inverse norms, the tile sweep (tiles.cu) and the statistics merge. fp16/bf16
// run on tensor cores with fp32 accumulation; fp32 on TF32 tensor cores when
// `tensor_cores`, else in IEEE fp32 FMAs (torch's matmul without allow_tf32).
template <typename In>
void forward(const Params<In>& p, const Stats& s, const Workspace& w, bool tensor_cores,
             cudaStream_t stream);

// Buffers of the backward. A strip is `strip` rows of X (or columns of Y,
// for dY^) against all of the other side.
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
// Tiles are kTileRows rows (image side) x kTileCols columns (text side);
// strips are whole row tiles.
constexpr int64_t kTileRows = 128, kTileCols = 64;
constexpr int64_t kStripAlign = kTileRows;

// Backward by strips (tiles.cu): for each strip, a kernel recomputes the
// strip's logits and writes G (P + Q - 2[i==j], in In) once, then a GEMM kernel
// multiplies it by the other side's unit rows with fp32 accumulation over all
// n, and the normalisation backward finishes the strip's rows, scaled by
// factor * (*coef) (coef read on the device). Extra memory is one strip of G
// plus O(k_splits * strip * d): no n x d accumulator. grad_x / grad_y may be
// null when not needed; scale_acc receives the unscaled sums
// sum_ij (P + Q - 2[i==j]) * cos_ij when need_scale.
template <typename In>
void backward(const Params<In>& p, const Stats& s, float factor, const float* coef,
              const StripWorkspace<In>& w, bool tensor_cores, bool need_scale, In* grad_x,
              In* grad_y, cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
