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

// Buffers of the backward, which sweeps G by square panels (tiles.cu): for
// row panel I, column panel J, G_IJ is recomputed once into g_panel and feeds
// both dX^[I] += G_IJ Y^[J] (fp32, x_acc) and dY^[J] += G_IJ^T X^[I].
template <typename In>
struct PanelWorkspace {
  int64_t panel;       // rows = columns of a panel, a multiple of kPanelAlign
  int64_t ld;          // n rounded up to kPanelAlign
  In* g_panel;         // (panel, panel) G of one panel, in In
  float* x_acc;        // (panel, d) fp32 dX^ of one row panel; null without grad_x
  uint8_t* y_lo;       // low bits of the split dY^ accumulator: bf16 (n, ceil(d / 2)), fp16 (n, d)
                       // (16-bit In with grad_y; null otherwise)
  float* scale_part;   // (panel / 128)^2 per-tile partial sums (SigLIP: 2x, then the bias's)
  float* scale_acc;    // (ceil(n / panel))^2 per-panel sums, row panel major
  float* bias_acc = nullptr;  // SigLIP: as scale_acc, for the bias gradient
};
// Tiles are kTileRows rows (image side) x kTileCols columns (text side);
// panels are whole tiles.
constexpr int64_t kTileRows = 128, kTileCols = 128;
constexpr int64_t kPanelAlign = kTileRows;

// Backward by panels (tiles.cu), 3 GEMM-equivalents: G is recomputed once.
// dX^ of a row panel accumulates in x_acc (fp32) and is finished (the
// normalisation backward, scaled by factor * (*coef), coef read on the
// device) when the row panel is done. dY^ accumulates over the row panels in
// grad_y itself: fp32 for float; for bf16 a 20-bit and for fp16 a 24-bit
// float (8-bit exponent; the top 16 bits of the fp32 pattern in grad_y's
// storage, the next 4 or 8 in y_lo), round to nearest at every update,
// finished in place at the end. grad_x / grad_y may be null when not needed; scale_acc receives the
// unscaled sums sum_ij (P + Q - 2[i==j]) * cos_ij per panel when need_scale.
template <typename In>
void backward(const Params<In>& p, const Stats& s, float factor, const float* coef,
              const PanelWorkspace<In>& w, bool tensor_cores, bool need_scale, In* grad_x,
              In* grad_y, cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
