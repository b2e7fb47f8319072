// CUDA backend of the fused CLIP loss: the kernels every path shares (inverse
// norms, the merge of the forward's statistics partials, the normalisation
// backward) and the forward's driver. The tile kernels, on tensor cores or
// IEEE fp32 FMAs, are in tiles.cu; the per-element math is tile_math.h's, as
// on the CPU.
//
// Every kernel runs on the caller's stream; every launch is checked and a
// failure comes back as an exception naming the kernel.
#include "cuda/clip_loss_cuda.h"

#include "clipfast/tile_math.h"
#include "cuda/common.cuh"

namespace clipfast {
namespace cuda {
namespace {

template <typename In>
__global__ void inverse_norms_kernel(const In* x, int64_t n, int64_t d, bool normalize, float* inv) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  float sum = 0.f;
  for (int64_t k = lane; k < d; k += 32) {
    const float v = to_float(x[row * d + k]);
    sum = fmaf(v, v, sum);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  float scale = 1.f;
  if (!isfinite(sum)) {
    // Squares past fp32's range (rows from ~1.8e19 on; or a NaN / inf entry,
    // which stays NaN): again on the row divided by a power of two near its
    // largest entry (tile_math.h). Underflow needs no such pass: a row whose
    // squares underflow has a norm below eps. A uniform branch per warp.
    float top = 0.f;
    for (int64_t k = lane; k < d; k += 32) top = fmaxf(top, fabsf(to_float(x[row * d + k])));
    for (int offset = 16; offset > 0; offset /= 2)
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
    scale = pow2_scale(top);
    sum = 0.f;
    for (int64_t k = lane; k < d; k += 32) {
      const float v = to_float(x[row * d + k]) / scale;
      sum = fmaf(v, v, sum);
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  if (lane == 0) inv[row] = inverse_norm<float>(sum, scale, normalize);
}

__global__ void merge_stats_kernel(const float* part_max, const float* part_sum, int64_t parts,
                                   int64_t n, float* out_max, float* out_logsum) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float m = -INFINITY, s = 0.f;
  for (int64_t t = 0; t < parts; ++t) lse_merge(m, s, part_max[t * n + j], part_sum[t * n + j]);
  out_max[j] = m;
  out_logsum[j] = logf(s);
}

// See launch_finish (common.cuh). One warp per row.
template <typename In>
__global__ void finish_kernel(const float* acc, int64_t parts, int64_t part_stride,
                              const In* features, const float* inv_norm, int64_t rows, int64_t d,
                              float factor, const float* coef, bool normalize, In* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const float scaled = coef == nullptr ? factor : factor * *coef;
  auto grad_at = [&](int64_t k) {
    float g = 0.f;
    for (int64_t t = 0; t < parts; ++t) g += acc[t * part_stride + row * d + k];
    return g * scaled;
  };
  finish_row(grad_at, features + row * d, inv_norm[row], d, normalize, out + row * d);
}

constexpr int kRowsPerBlock = 8;  // warps per block of the per-row kernels


}  // namespace

template <typename In>
void launch_finish(const float* acc, int64_t parts, int64_t part_stride, const In* features,
                   const float* inv_norm, int64_t rows, int64_t d, float factor,
                   const float* coef_device, bool normalize, In* out, cudaStream_t stream,
                   const char* what) {
  finish_kernel<In><<<ceil_div(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, stream>>>(
      acc, parts, part_stride, features, inv_norm, rows, d, factor, coef_device, normalize, out);
  check_launch(what);
}

template <typename In>
void launch_inverse_norms(const In* x, int64_t n, int64_t d, bool normalize, float* inv,
                          cudaStream_t stream, const char* what) {
  inverse_norms_kernel<In><<<ceil_div(n, kRowsPerBlock), 32 * kRowsPerBlock, 0, stream>>>(
      x, n, d, normalize, inv);
  check_launch(what);
}

template <typename In>
void forward(const Params<In>& p, const Stats& s, const Workspace& w, bool tensor_cores,
             cudaStream_t stream) {
  const int64_t n = p.n;
  launch_inverse_norms<In>(p.x, n, p.d, p.normalize, p.inv_x, stream,
                           "inverse_norms_kernel (image)");
  launch_inverse_norms<In>(p.y, n, p.d, p.normalize, p.inv_y, stream,
                           "inverse_norms_kernel (text)");
  forward_tiles<In>(p, s, w, tensor_cores, stream);
  merge_stats_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(w.row_max_part, w.row_sum_part,
                                                           w.col_splits, n, s.row_max, s.row_logsum);
  check_launch("merge_stats_kernel (rows)");
  merge_stats_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(w.col_max_part, w.col_sum_part,
                                                           w.row_splits, n, s.col_max, s.col_logsum);
  check_launch("merge_stats_kernel (columns)");
}

#define CLIPFAST_INSTANTIATE(In)                                                              \
  template void forward<In>(const Params<In>&, const Stats&, const Workspace&, bool,          \
                            cudaStream_t);                                                   \
  template void launch_finish<In>(const float*, int64_t, int64_t, const In*, const float*,    \
                                  int64_t, int64_t, float, const float*, bool, In*,           \
                                  cudaStream_t, const char*);
CLIPFAST_INSTANTIATE(float)
CLIPFAST_INSTANTIATE(__half)
CLIPFAST_INSTANTIATE(__nv_bfloat16)

// For SigLIP's forward (siglip.cu).
#define CLIPFAST_INSTANTIATE_NORMS(In)                                                         \
  template void launch_inverse_norms<In>(const In*, int64_t, int64_t, bool, float*,           \
                                         cudaStream_t, const char*);
CLIPFAST_INSTANTIATE_NORMS(float)
CLIPFAST_INSTANTIATE_NORMS(__half)
CLIPFAST_INSTANTIATE_NORMS(__nv_bfloat16)

}  // namespace cuda
}  // namespace clipfast
