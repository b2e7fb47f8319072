// CUDA backend of the fused CLIP loss: same algorithm and per-element math
// (tile_math.h) as the C++ CPU backend, on 64 x 64 tiles held on chip.
//
// This file holds the SIMT path (fp32 inputs by default) and the kernels
// every path shares (inverse norms, statistics merge, normalisation
// backward); tensor_core_tiles.cu holds the fp16/bf16 tensor-core tiles.
//
// Forward: a ROW_SPLITS x COL_SPLITS grid of blocks, each sweeping its
// super-tile; row statistics stay in shared memory across the block's
// columns, column statistics go to the block's private slice of a
// (ROW_SPLITS, N) partial buffer (no atomics), merged by a last kernel.
// Backward recomputes the tiles twice: by row blocks (dX^ and the scale
// gradient) and by column blocks (dY^); each block owns its output rows, so
// accumulation needs no atomics. A finishing kernel applies the
// normalisation backward and writes the input dtype.
//
// Every kernel runs on the caller's stream; every launch is checked and a
// failure comes back as an exception naming the kernel.
#include "cuda/clip_loss_cuda.h"

#include "clipfast/tile_math.h"
#include "cuda/common.cuh"

#include <type_traits>

namespace clipfast {
namespace cuda {
namespace {

constexpr int kTile = 64;     // rows and columns of a tile
constexpr int kChunk = 32;    // depth of one shared-memory stage
constexpr int kThreads = 256; // 16 x 16 threads, 4 x 4 outputs each

// Raw dot products of the tile rows [row0, row0 + 64) x columns [col0, col0 + 64)
// into acc[4][4] (this thread's 4 x 4 outputs). Rows/columns past n read as 0.
// Forward and backward both call this, so recomputed logits are bit-identical.
template <typename In>
__device__ void tile_dots(const In* x, const In* y, int64_t n, int64_t d, int64_t row0,
                          int64_t col0, float (*xs)[kTile + 1], float (*ys)[kTile + 1],
                          float acc[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    // 64 x 32 values of each side; 8 per thread, stored k-major.
    for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
      const int r = e / kChunk, k = e % kChunk;
      const int64_t gk = k0 + k;
      const int64_t gx = row0 + r, gy = col0 + r;
      xs[k][r] = (gx < n && gk < d) ? to_float(x[gx * d + gk]) : 0.f;
      ys[k][r] = (gy < n && gk < d) ? to_float(y[gy * d + gk]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kChunk; ++k) {
      float xa[4], yb[4];
      for (int a = 0; a < 4; ++a) xa[a] = xs[k][ty * 4 + a];
      for (int b = 0; b < 4; ++b) yb[b] = ys[k][tx * 4 + b];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(xa[a], yb[b], acc[a][b]);
    }
    __syncthreads();
  }
}

// Logits of the tile into shared `logits`; entries outside the problem are -inf.
template <typename In>
__device__ void tile_logits(const Params<In>& p, int64_t row0, int64_t col0,
                            float (*xs)[kTile + 1], float (*ys)[kTile + 1],
                            float (*logits)[kTile + 1]) {
  float acc[4][4];
  tile_dots(p.x, p.y, p.n, p.d, row0, col0, xs, ys, acc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < 4; ++b) {
      const int r = ty * 4 + a, c = tx * 4 + b;
      const int64_t gi = row0 + r, gj = col0 + c;
      float cosine = 0.f, logit = -INFINITY;
      if (gi < p.n && gj < p.n) {
        logit = pair_logit<float>(acc[a][b], p.inv_x[gi], p.inv_y[gj], p.scale, p.bias, &cosine);
      }
      logits[r][c] = logit;
    }
  }
  __syncthreads();
}

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
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0) inv[row] = inverse_norm<float>(sum, normalize);
}

template <typename In>
__global__ void forward_kernel(Params<In> p, int64_t row_blocks_per_split,
                               int64_t col_blocks_per_split, float* row_max_part,
                               float* row_sum_part, float* col_max_part, float* col_sum_part,
                               float* diag) {
  __shared__ float xs[kChunk][kTile + 1], ys[kChunk][kTile + 1];
  __shared__ float logits[kTile][kTile + 1];
  __shared__ float row_max[kTile], row_sum[kTile];
  const int64_t n = p.n, blocks = (n + kTile - 1) / kTile;
  const int64_t rb0 = blockIdx.x * row_blocks_per_split;
  const int64_t rb1 = min(blocks, rb0 + row_blocks_per_split);
  const int64_t cb0 = blockIdx.y * col_blocks_per_split;
  const int64_t cb1 = min(blocks, cb0 + col_blocks_per_split);
  float* my_col_max = col_max_part + static_cast<int64_t>(blockIdx.x) * n;
  float* my_col_sum = col_sum_part + static_cast<int64_t>(blockIdx.x) * n;
  // 4 threads per row (or column), 16 entries each.
  const int line = threadIdx.x / 4, part = threadIdx.x % 4;

  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const int64_t row0 = rb * kTile;
    if (threadIdx.x < kTile) {
      row_max[threadIdx.x] = -INFINITY;
      row_sum[threadIdx.x] = 0.f;
    }
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t col0 = cb * kTile;
      tile_logits(p, row0, col0, xs, ys, logits);
      // Row statistics of this tile, merged into the running ones.
      float m, s;
      lse_of_line(&logits[line][part * 16], 16, 1, m, s);
      lse_merge_lanes(m, s, 4);
      if (part == 0 && row0 + line < n) lse_merge(row_max[line], row_sum[line], m, s);
      // Column statistics, into this block's private partial slice.
      lse_of_line(&logits[part * 16][line], 16, kTile + 1, m, s);
      lse_merge_lanes(m, s, 4);
      const int64_t gj = col0 + line;
      if (part == 0 && gj < n) lse_merge(my_col_max[gj], my_col_sum[gj], m, s);
      // The label logit, from the very tile the statistics saw.
      if (threadIdx.x < kTile) {
        const int64_t gi = row0 + threadIdx.x;
        if (gi < n && gi >= col0 && gi < col0 + kTile) diag[gi] = logits[threadIdx.x][gi - col0];
      }
      __syncthreads();
    }
    if (threadIdx.x < kTile && row0 + threadIdx.x < n) {
      const int64_t out = static_cast<int64_t>(blockIdx.y) * n + row0 + threadIdx.x;
      row_max_part[out] = row_max[threadIdx.x];
      row_sum_part[out] = row_sum[threadIdx.x];
    }
    __syncthreads();
  }
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

// dX^ (ROWS) or dY^ (columns) of one 64-row output block, accumulated in fp32
// `acc` (n x d): acc[out rows] += sum over the other side's tiles of
// G (64 x 64) @ unit rows of the other side (64 x d), 64 columns of d at a time.
template <typename In, bool ROWS>
__global__ void grads_kernel(Params<In> p, Stats s, float* acc, float* scale_grad_part) {
  // One staging buffer serves the dot products (two 32 x 65 halves) and then
  // the other side's unit rows (64 x 65): 33 KB of shared memory in all.
  __shared__ float stage[kTile][kTile + 1];
  __shared__ float weights[kTile][kTile + 1];
  float (*xs)[kTile + 1] = stage;
  float (*ys)[kTile + 1] = stage + kChunk;
  float (*other)[kTile + 1] = stage;
  const int64_t n = p.n, d = p.d, blocks = (n + kTile - 1) / kTile;
  const int64_t out0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float scale_grad = 0.f;

  for (int64_t ob = 0; ob < blocks; ++ob) {
    const int64_t row0 = ROWS ? out0 : ob * kTile;
    const int64_t col0 = ROWS ? ob * kTile : out0;
    float dots[4][4];
    tile_dots(p.x, p.y, n, d, row0, col0, xs, ys, dots);
    // Gradient weights G = (P - [label]) + (Q - [label]) from the same logits
    // the forward pass saw (same dots, same pair_logit).
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        const int r = ty * 4 + a, c = tx * 4 + b;
        const int64_t gi = row0 + r, gj = col0 + c;
        float g = 0.f;
        if (gi < n && gj < n) {
          float cosine;
          const float logit = pair_logit<float>(dots[a][b], p.inv_x[gi], p.inv_y[gj], p.scale,
                                                p.bias, &cosine);
          g = grad_weight<float>(logit, s.row_max[gi], s.row_logsum[gi], s.col_max[gj],
                                 s.col_logsum[gj], gi == gj);
          if (ROWS) scale_grad += g * cosine;
        }
        weights[r][c] = g;
      }
    }
    __syncthreads();
    // acc[out rows, k0:k0+64] += W (64 x 64) @ other-side unit rows (64 x 64).
    const In* src = ROWS ? p.y : p.x;
    const float* src_inv = ROWS ? p.inv_y : p.inv_x;
    const int64_t src0 = ROWS ? col0 : row0;
    for (int64_t k0 = 0; k0 < d; k0 += kTile) {
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int r = e / kTile, k = e % kTile;
        const int64_t g = src0 + r, gk = k0 + k;
        other[r][k] = (g < n && gk < d) ? to_float(src[g * d + gk]) * src_inv[g] : 0.f;
      }
      __syncthreads();
      float sum[4][4] = {};
      for (int j = 0; j < kTile; ++j) {
        float w[4], o[4];
        for (int a = 0; a < 4; ++a) w[a] = ROWS ? weights[ty * 4 + a][j] : weights[j][ty * 4 + a];
        for (int b = 0; b < 4; ++b) o[b] = other[j][tx * 4 + b];
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) sum[a][b] = fmaf(w[a], o[b], sum[a][b]);
      }
      for (int a = 0; a < 4; ++a) {
        const int64_t gr = out0 + ty * 4 + a;
        for (int b = 0; b < 4; ++b) {
          const int64_t gk = k0 + tx * 4 + b;
          if (gr < n && gk < d) acc[gr * d + gk] += sum[a][b];
        }
      }
      __syncthreads();
    }
  }
  if (ROWS) {
    const float total = block_sum<kThreads>(scale_grad);
    if (threadIdx.x == 0) scale_grad_part[blockIdx.x] = total;
  }
}

// See launch_finish (common.cuh). One warp per row.
template <typename In>
__global__ void finish_kernel(const float* acc, int64_t parts, int64_t part_stride,
                              const In* features, const float* inv_norm, int64_t rows, int64_t d,
                              float factor, const float* coef, bool normalize, In* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float scaled = coef == nullptr ? factor : factor * *coef;
  const float inv = inv_norm[row];
  auto grad_at = [&](int64_t k) {
    float g = 0.f;
    for (int64_t t = 0; t < parts; ++t) g += acc[t * part_stride + row * d + k];
    return g * scaled;
  };
  float radial = 0.f;
  if (normalize && !norm_is_clamped(inv)) {
    for (int64_t k = lane; k < d; k += 32)
      radial = fmaf(grad_at(k), to_float(features[row * d + k]) * inv, radial);
    for (int offset = 16; offset > 0; offset /= 2)
      radial += __shfl_xor_sync(0xffffffffu, radial, offset);
  }
  for (int64_t k = lane; k < d; k += 32) {
    float g = grad_at(k);
    if (normalize) g = (g - to_float(features[row * d + k]) * inv * radial) * inv;
    out[row * d + k] = from_float<In>(g);
  }
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
void forward(const Params<In>& p, const Stats& s, const Workspace& w, bool tf32,
             cudaStream_t stream) {
  const int64_t n = p.n;
  inverse_norms_kernel<In><<<ceil_div(n, kRowsPerBlock), 32 * kRowsPerBlock, 0, stream>>>(
      p.x, n, p.d, p.normalize, p.inv_x);
  check_launch("inverse_norms_kernel (image)");
  inverse_norms_kernel<In><<<ceil_div(n, kRowsPerBlock), 32 * kRowsPerBlock, 0, stream>>>(
      p.y, n, p.d, p.normalize, p.inv_y);
  check_launch("inverse_norms_kernel (text)");
  if (std::is_same_v<In, float> && !tf32) {
    const int64_t blocks = ceil_div(n, kTile);
    const int64_t row_per = ceil_div(blocks, w.row_splits);
    const int64_t col_per = ceil_div(blocks, w.col_splits);
    dim3 grid(static_cast<unsigned>(w.row_splits), static_cast<unsigned>(w.col_splits));
    forward_kernel<In><<<grid, kThreads, 0, stream>>>(p, row_per, col_per, w.row_max_part,
                                                        w.row_sum_part, w.col_max_part,
                                                        w.col_sum_part, s.diag);
    check_launch("forward_kernel");
  } else {
    tensor_core_forward_tiles<In>(p, s, w, stream);
  }
  merge_stats_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(w.row_max_part, w.row_sum_part,
                                                           w.col_splits, n, s.row_max, s.row_logsum);
  check_launch("merge_stats_kernel (rows)");
  merge_stats_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(w.col_max_part, w.col_sum_part,
                                                           w.row_splits, n, s.col_max, s.col_logsum);
  check_launch("merge_stats_kernel (columns)");
}

template <typename In>
void backward(const Params<In>& p, const Stats& s, float factor, const float* coef,
              float* acc_x, float* acc_y, float* scale_grad_part, In* grad_x, In* grad_y,
              cudaStream_t stream) {
  const int64_t n = p.n, blocks = ceil_div(n, kTile);
  // The row pass always runs: it also yields the scale gradient.
  grads_kernel<In, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      p, s, acc_x, scale_grad_part);
  check_launch("grads_kernel (rows)");
  if (grad_x != nullptr) {
    launch_finish<In>(acc_x, 1, 0, p.x, p.inv_x, n, p.d, factor, coef, p.normalize, grad_x,
                      stream, "finish_kernel (image)");
  }
  if (grad_y != nullptr) {
    grads_kernel<In, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p, s, acc_y, nullptr);
    check_launch("grads_kernel (columns)");
    launch_finish<In>(acc_y, 1, 0, p.y, p.inv_y, n, p.d, factor, coef, p.normalize, grad_y,
                      stream, "finish_kernel (text)");
  }
}

#define CLIPFAST_INSTANTIATE(In)                                                              \
  template void forward<In>(const Params<In>&, const Stats&, const Workspace&, bool,          \
                            cudaStream_t);                                                   \
  template void backward<In>(const Params<In>&, const Stats&, float, const float*, float*,    \
                             float*, float*, In*, In*, cudaStream_t);                          \
  template void launch_finish<In>(const float*, int64_t, int64_t, const In*, const float*,    \
                                  int64_t, int64_t, float, const float*, bool, In*,           \
                                  cudaStream_t, const char*);
CLIPFAST_INSTANTIATE(float)
CLIPFAST_INSTANTIATE(__half)
CLIPFAST_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace clipfast
