// CUDA backend of the fused SigLIP loss: the forward's driver (siglip.cu) and
// the tile engine's SigLIP epilogues (tiles.cu). Plain pointers, as for CLIP
// (clip_loss_cuda.h, whose Params and PanelWorkspace it shares).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/clip_loss_cuda.h"

namespace clipfast {
namespace cuda {

struct SiglipWorkspace {
  int64_t row_splits;  // the forward's grid, as Workspace's
  int64_t col_splits;
  float* loss_part;    // (row_splits * col_splits) per-block sums of -logsigmoid(z L)
};

// Inverse norms into p.inv_x / p.inv_y, then the tile sweep's partial sums
// of -logsigmoid(z L) (z = +1 on (i, i) when `positives`, -1 elsewhere).
template <typename In>
void siglip_forward(const Params<In>& p, bool positives, const SiglipWorkspace& w,
                    bool tensor_cores, cudaStream_t stream);

// Defined in tiles.cu: the sweep alone, after the inverse norms.
template <typename In>
void siglip_forward_tiles(const Params<In>& p, bool positives, const SiglipWorkspace& w,
                          bool tensor_cores, cudaStream_t stream);

// Defined in tiles.cu: CLIP's backward by square panels (clip_loss_cuda.h)
// with G_ij = -z sigmoid(-z L_ij) = N dloss/dL_ij; gradients scaled by
// factor * (*coef). With need_sums, w.scale_part holds 2 (panel / 128)^2
// floats and scale_acc / bias_acc receive, per panel, sum G cos and sum G.
template <typename In>
void siglip_backward(const Params<In>& p, bool positives, float factor, const float* coef,
                     const PanelWorkspace<In>& w, bool tensor_cores, bool need_sums, In* grad_x,
                     In* grad_y, cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
