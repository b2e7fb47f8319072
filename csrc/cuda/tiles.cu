// Tile kernels of the CUDA backend: the forward sweep, the backward's
// recomputation of G by strips and the strip GEMM, each in one of two
// arithmetic engines (TileAccumulator): tensor cores (WMMA; fp16/bf16
// 16 x 16 x 16 fragments, fp32 as TF32 16 x 16 x 8) or IEEE fp32 FMAs, always
// accumulating in fp32. The per-element math is tile_math.h's, as on the CPU.
//
// Tiles are 128 rows (image side) x 64 columns (text side) for 256 threads
// (8 warps of 32 x 32 outputs, or 16 x 16 threads of 8 x 4 outputs). The
// forward sweeps a ROW_SPLITS x COL_SPLITS grid of super-tiles, the row
// statistics in shared memory across a block's columns, the column
// statistics in the block's private slice of a (ROW_SPLITS, N) partial buffer
// (no atomics), merged afterwards. Each tile's raw dot products go through
// shared memory (fp32), where the epilogue reads rows and columns alike;
// every pass computes a tile with the same function from the same origin, so
// the backward's logits equal the forward's bit for bit.
//
// Backward by strips (DESIGN.md's "materialise small chunks of G and hand them
// to a GEMM"): for `strip` rows of X, one kernel recomputes their logits
// against every column and writes G = P + Q - 2[i==j] in the input dtype
// (values in [-2, 2]: neither fp16 nor bf16 overflows); a GEMM kernel then
// forms G_strip @ Y^ with fp32 accumulation over all n columns (split-K
// partials when the strip alone cannot fill the GPU), and the normalisation
// backward finishes the strip's gradient rows. dY^ repeats this over strips
// of columns with G^T. Extra memory: one G strip and O(k_splits * strip * d)
// fp32, never an n x d accumulator; cost: 10 N^2 d FLOPs against the
// 8 N^2 d of four GEMMs (G is recomputed once per side).
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "clipfast/tile_math.h"
#include "cuda/clip_loss_cuda.h"
#include "cuda/common.cuh"

namespace clipfast {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kRows = kTileRows;   // tile rows; also the strip alignment
constexpr int kCols = kTileCols;   // tile columns
constexpr int kDepth = 32;         // K of one shared-memory stage
constexpr int kFrag = 16;          // WMMA fragment rows and columns
constexpr int kThreads = 256;      // 8 warps, 4 (rows) x 2 (columns)
constexpr int kWarpSide = 32;      // each warp owns 32 x 32 outputs: 2 x 2 fragments
constexpr int kLdTile = kCols + 4; // fp32 tile rows
static_assert(kStripAlign == kRows, "strips are whole row tiles");
static_assert(kRows == 4 * kWarpSide && kCols == 2 * kWarpSide, "8 warps as 4 x 2");

// Per storage type: the fragment element type and K, and the padding of
// staged rows (16-row steps of a fragment must stay 32-byte aligned).
// float runs TF32 (10-bit mantissa products, fp32 accumulation), as torch's
// matmul does under allow_tf32.
template <typename In>
struct Mma {
  using Element = In;
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
  template <typename Fragment>
  __device__ static void round(Fragment&) {}
};
template <>
struct Mma<float> {
  using Element = wmma::precision::tf32;
  static constexpr int kK = 8;
  static constexpr int kPad = 4;
  template <typename Fragment>
  __device__ static void round(Fragment& f) {
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
  }
};

template <typename In>
constexpr int kLdStage = kDepth + Mma<In>::kPad;  // staged X / Y / G rows
template <typename In>
constexpr int kLdPanel = kCols + Mma<In>::kPad;   // staged K x 64 panels of the GEMM's B
template <typename In>
constexpr int kVecWidth = 16 / sizeof(In);        // elements per 16-byte vector

// Staged operands and the fp32 tile are never live at once: one buffer.
constexpr size_t kStageBytes = (kRows + kCols) * (kDepth + 4) * sizeof(float);
constexpr size_t kTileBytes = kRows * kLdTile * sizeof(float);
constexpr size_t kSmemBytes = kStageBytes > kTileBytes ? kStageBytes : kTileBytes;
static_assert((kRows + kCols) * (kDepth + 8) * 2 <= kSmemBytes, "16-bit stages fit");
static_assert(kRows * (kDepth + 4) * 4 + kDepth * (kCols + 4) * 4 <= kSmemBytes, "GEMM stage fits");

template <typename In>
using AccFragment = wmma::fragment<wmma::accumulator, kFrag, kFrag, Mma<In>::kK, float>;
template <typename In, typename Layout>
using AFragment =
    wmma::fragment<wmma::matrix_a, kFrag, kFrag, Mma<In>::kK, typename Mma<In>::Element, Layout>;
template <typename In, typename Layout>
using BFragment =
    wmma::fragment<wmma::matrix_b, kFrag, kFrag, Mma<In>::kK, typename Mma<In>::Element, Layout>;

// Rows [first, first + ROWS) x depth [k0, k0 + kDepth) of a row-major (n, d)
// matrix into stage[r * kLdStage<In> + k], zeros past n or d.
template <typename In, int ROWS>
__device__ __forceinline__ void stage_rows(const In* src, int64_t n, int64_t d, int64_t first,
                                           int64_t k0, bool vec, In* stage) {
  constexpr int kLd = kLdStage<In>;
  if (vec) {  // d % kVecWidth == 0: a vector is wholly inside or wholly past d
    constexpr int kVecsPerRow = kDepth / kVecWidth<In>;
    for (int e = threadIdx.x; e < ROWS * kVecsPerRow; e += kThreads) {
      const int r = e / kVecsPerRow, k = (e % kVecsPerRow) * kVecWidth<In>;
      const int64_t g = first + r, gk = k0 + k;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (g < n && gk < d) v = *reinterpret_cast<const uint4*>(src + g * d + gk);
      *reinterpret_cast<uint4*>(stage + r * kLd + k) = v;
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * kDepth; e += kThreads) {
      const int r = e / kDepth, k = e % kDepth;
      const int64_t g = first + r, gk = k0 + k;
      stage[r * kLd + k] = (g < n && gk < d) ? src[g * d + gk] : from_float<In>(0.f);
    }
  }
}

// This thread's share of a kRows x kCols fp32 product tile and the two kinds
// of shared-memory stage (K = kDepth) that feed it. TC: tensor cores (WMMA),
// each warp 32 x 32 outputs as 2 x 2 fragments. Otherwise IEEE fp32 FMAs,
// each thread 8 x 4 outputs, k in ascending order. Either way the same
// engine computes a tile in every pass, so recomputed logits are identical.
template <typename In, bool TC>
struct TileAccumulator;

template <typename In>
struct TileAccumulator<In, true> {
  AccFragment<In> frag[2][2];

  __device__ void zero() {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(frag[i][j], 0.f);
  }
  // acc += A B with A's rows at a[row * lda + k] and B's columns at
  // b[col * col_stride + k * k_stride] (ldb: B's leading dimension in BLayout).
  template <typename BLayout>
  __device__ void stage(const In* a, int lda, const In* b, int col_stride, int k_stride, int ldb) {
    const int warp = threadIdx.x / 32, warp_row = warp / 2, warp_col = warp % 2;
#pragma unroll
    for (int kk = 0; kk < kDepth; kk += Mma<In>::kK) {
      AFragment<In, wmma::row_major> fa[2];
      BFragment<In, BLayout> fb[2];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], a + (warp_row * kWarpSide + i * kFrag) * lda + kk, lda);
        Mma<In>::round(fa[i]);
      }
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(
            fb[j], b + (warp_col * kWarpSide + j * kFrag) * col_stride + kk * k_stride, ldb);
        Mma<In>::round(fb[j]);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(frag[i][j], fa[i], fb[j], frag[i][j]);
    }
  }
  // S += X Y^T from rows staged [row][k] on both sides.
  __device__ void stage_dots(const In* xs, const In* ys) {
    constexpr int kLd = kLdStage<In>;
    // Y rows stored [column][k] are Y^T in column-major order.
    stage<wmma::col_major>(xs, kLd, ys, kLd, 1, kLd);
  }
  // C += A B from A staged [row][k] and B staged [k][column].
  __device__ void stage_product(const In* as, const In* panel) {
    stage<wmma::row_major>(as, kLdStage<In>, panel, 1, kLdPanel<In>, kLdPanel<In>);
  }
  __device__ void store(float* tile) const {
    const int warp = threadIdx.x / 32, warp_row = warp / 2, warp_col = warp % 2;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(
            tile + (warp_row * kWarpSide + i * kFrag) * kLdTile + warp_col * kWarpSide + j * kFrag,
            frag[i][j], kLdTile, wmma::mem_row_major);
  }
};

template <typename In>
struct TileAccumulator<In, false> {
  static constexpr int kRowsPerThread = kRows / 16, kColsPerThread = kCols / 16;
  float value[kRowsPerThread][kColsPerThread];

  __device__ int row0() const { return (threadIdx.x / 16) * kRowsPerThread; }
  __device__ int col0() const { return (threadIdx.x % 16) * kColsPerThread; }
  __device__ void zero() {
    for (int i = 0; i < kRowsPerThread; ++i)
      for (int j = 0; j < kColsPerThread; ++j) value[i][j] = 0.f;
  }
  // acc += A B, A's rows at a[row * lda + k], B's columns at
  // b[col * col_stride + k * k_stride].
  __device__ void stage(const In* a, int lda, const In* b, int col_stride, int k_stride) {
    const int r0 = row0(), c0 = col0();
    for (int k = 0; k < kDepth; ++k) {
      float av[kRowsPerThread], bv[kColsPerThread];
      for (int i = 0; i < kRowsPerThread; ++i) av[i] = to_float(a[(r0 + i) * lda + k]);
      for (int j = 0; j < kColsPerThread; ++j) bv[j] = to_float(b[(c0 + j) * col_stride + k * k_stride]);
      for (int i = 0; i < kRowsPerThread; ++i)
        for (int j = 0; j < kColsPerThread; ++j) value[i][j] = fmaf(av[i], bv[j], value[i][j]);
    }
  }
  __device__ void stage_dots(const In* xs, const In* ys) {
    stage(xs, kLdStage<In>, ys, kLdStage<In>, 1);
  }
  __device__ void stage_product(const In* as, const In* panel) {
    stage(as, kLdStage<In>, panel, 1, kLdPanel<In>);
  }
  __device__ void store(float* tile) const {
    const int r0 = row0(), c0 = col0();
    for (int i = 0; i < kRowsPerThread; ++i)
      for (int j = 0; j < kColsPerThread; ++j) tile[(r0 + i) * kLdTile + c0 + j] = value[i][j];
  }
};
static_assert(kThreads == 256 && kRows % 16 == 0 && kCols % 16 == 0, "16 x 16 FMA threads");

// Raw dot products of rows [row0, row0 + kRows) of X with rows
// [col0, col0 + kCols) of Y into the fp32 tile at the start of `smem`
// (row stride kLdTile). Rows past n give 0.
template <typename In, bool TC>
__device__ void tile_dots(const Params<In>& p, bool vec, int64_t row0, int64_t col0,
                          unsigned char* smem) {
  In* xs = reinterpret_cast<In*>(smem);
  In* ys = xs + kRows * kLdStage<In>;
  TileAccumulator<In, TC> acc;
  acc.zero();
  for (int64_t k0 = 0; k0 < p.d; k0 += kDepth) {
    stage_rows<In, kRows>(p.x, p.n, p.d, row0, k0, vec, xs);
    stage_rows<In, kCols>(p.y, p.n, p.d, col0, k0, vec, ys);
    __syncthreads();
    acc.stage_dots(xs, ys);
    __syncthreads();
  }
  // The staged operands are dead: the tile takes their place.
  acc.store(reinterpret_cast<float*>(smem));
  __syncthreads();
}

// The forward sweep of one super-tile: row statistics in shared memory
// across the block's columns, column statistics in the block's private slice
// of the (row_splits, n) partials, the label logits from the same tiles.
template <typename In, bool TC>
__global__ void __launch_bounds__(kThreads)
    forward_tiles_kernel(Params<In> p, bool vec, int64_t row_blocks_per_split,
                         int64_t col_blocks_per_split, float* row_max_part, float* row_sum_part,
                         float* col_max_part, float* col_sum_part, float* diag) {
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  __shared__ float row_max[kRows], row_sum[kRows];
  float* tile = reinterpret_cast<float*>(smem);
  const int64_t n = p.n;
  const int64_t row_blocks = ceil_div(n, kRows), col_blocks = ceil_div(n, kCols);
  const int64_t rb0 = blockIdx.x * row_blocks_per_split;
  const int64_t rb1 = min(row_blocks, rb0 + row_blocks_per_split);
  const int64_t cb0 = blockIdx.y * col_blocks_per_split;
  const int64_t cb1 = min(col_blocks, cb0 + col_blocks_per_split);
  float* my_col_max = col_max_part + static_cast<int64_t>(blockIdx.x) * n;
  float* my_col_sum = col_sum_part + static_cast<int64_t>(blockIdx.x) * n;

  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const int64_t row0 = rb * kRows;
    if (threadIdx.x < kRows) {
      row_max[threadIdx.x] = -INFINITY;
      row_sum[threadIdx.x] = 0.f;
    }
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t col0 = cb * kCols;
      tile_dots<In, TC>(p, vec, row0, col0, smem);
      for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
        const int r = e / kCols, c = e % kCols;
        const int64_t gi = row0 + r, gj = col0 + c;
        float* entry = tile + r * kLdTile + c;
        float cosine;
        *entry = (gi < n && gj < n)
                     ? pair_logit<float>(*entry, p.inv_x[gi], p.inv_y[gj], p.scale, p.bias, &cosine)
                     : -INFINITY;
      }
      __syncthreads();
      {  // rows: 2 lanes per row, interleaved columns
        const int r = threadIdx.x / 2, part = threadIdx.x % 2;
        float m, s;
        lse_of_line(tile + r * kLdTile + part, kCols / 2, 2, m, s);
        lse_merge_lanes(m, s, 2);
        if (part == 0 && row0 + r < n) lse_merge(row_max[r], row_sum[r], m, s);
      }
      {  // columns: 4 lanes per column, interleaved rows
        const int c = threadIdx.x / 4, part = threadIdx.x % 4;
        float m, s;
        lse_of_line(tile + part * kLdTile + c, kRows / 4, 4 * kLdTile, m, s);
        lse_merge_lanes(m, s, 4);
        const int64_t gj = col0 + c;
        if (part == 0 && gj < n) lse_merge(my_col_max[gj], my_col_sum[gj], m, s);
      }
      if (threadIdx.x < kRows) {  // the label logit, from the tile the statistics saw
        const int64_t gi = row0 + threadIdx.x;
        if (gi < n && gi >= col0 && gi < col0 + kCols)
          diag[gi] = tile[threadIdx.x * kLdTile + (gi - col0)];
      }
      __syncthreads();
    }
    if (threadIdx.x < kRows && row0 + threadIdx.x < n) {
      const int64_t out = static_cast<int64_t>(blockIdx.y) * n + row0 + threadIdx.x;
      row_max_part[out] = row_max[threadIdx.x];
      row_sum_part[out] = row_sum[threadIdx.x];
    }
    __syncthreads();
  }
}

// G of one tile of a strip, in the input dtype. ROWS: the strip is rows
// [strip0, strip0 + strip) of X against every column; g_strip[i - strip0][j].
// Otherwise it is columns [strip0, ...) of Y against every row, stored
// transposed: g_strip[j - strip0][i]. blockIdx.x walks the long side (all of
// n), blockIdx.y the strip. ROWS also leaves one unscaled scale-gradient
// partial sum_ij G_ij cos_ij per tile in scale_part (when not null).
template <typename In, bool TC, bool ROWS>
__global__ void __launch_bounds__(kThreads)
    grad_strip_kernel(Params<In> p, Stats s, bool vec, int64_t strip0, int64_t ld, In* g_strip,
                      float* scale_part) {
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  const float* tile = reinterpret_cast<const float*>(smem);
  const int64_t n = p.n;
  const int64_t row0 = ROWS ? strip0 + static_cast<int64_t>(blockIdx.y) * kRows
                            : static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t col0 = ROWS ? static_cast<int64_t>(blockIdx.x) * kCols
                            : strip0 + static_cast<int64_t>(blockIdx.y) * kCols;
  tile_dots<In, TC>(p, vec, row0, col0, smem);
  float scale_sum = 0.f;
  for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
    // Consecutive threads walk the stored row (columns of G, or rows of G for
    // the transposed strip), so the global writes coalesce.
    const int r = ROWS ? e / kCols : e % kRows;
    const int c = ROWS ? e % kCols : e / kRows;
    const int64_t gi = row0 + r, gj = col0 + c;
    float g = 0.f;
    if (gi < n && gj < n) {
      float cosine;
      const float logit = pair_logit<float>(tile[r * kLdTile + c], p.inv_x[gi], p.inv_y[gj],
                                            p.scale, p.bias, &cosine);
      g = grad_weight<float>(logit, s.row_max[gi], s.row_logsum[gi], s.col_max[gj],
                             s.col_logsum[gj], gi == gj);
      scale_sum += g * cosine;
    }
    const int64_t out = ROWS ? (gi - strip0) * ld + gj : (gj - strip0) * ld + gi;
    g_strip[out] = from_float<In>(g);
  }
  if (ROWS && scale_part != nullptr) {
    const float total = block_sum<kThreads>(scale_sum);
    if (threadIdx.x == 0) scale_part[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
  }
}

// out[0] = sum of part[0:count], in a fixed order (deterministic).
__global__ void sum_kernel(const float* part, int64_t count, float* out) {
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) sum += part[i];
  const float total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) out[0] = total;
}

// Rows [k0, k0 + kDepth) x columns [col0, col0 + kCols) of the unit rows
// src[k] * inv[k] (rounded to In, as a normalised copy would be) into
// panel[k * kLdPanel<In> + c], zeros past n or d.
template <typename In>
__device__ __forceinline__ void stage_unit_rows(const In* src, const float* inv, int64_t n,
                                                int64_t d, int64_t k0, int64_t col0, bool vec,
                                                In* panel) {
  constexpr int kLd = kLdPanel<In>, kWidth = kVecWidth<In>;
  if (vec) {
    constexpr int kVecsPerRow = kCols / kWidth;
    for (int e = threadIdx.x; e < kDepth * kVecsPerRow; e += kThreads) {
      const int k = e / kVecsPerRow, c = (e % kVecsPerRow) * kWidth;
      const int64_t g = k0 + k, gc = col0 + c;
      alignas(16) In values[kWidth];
      if (g < n && gc < d) {
        *reinterpret_cast<uint4*>(values) = *reinterpret_cast<const uint4*>(src + g * d + gc);
        const float scale = inv[g];
        for (int t = 0; t < kWidth; ++t) values[t] = from_float<In>(to_float(values[t]) * scale);
      } else {
        for (int t = 0; t < kWidth; ++t) values[t] = from_float<In>(0.f);
      }
      *reinterpret_cast<uint4*>(panel + k * kLd + c) = *reinterpret_cast<const uint4*>(values);
    }
  } else {
    for (int e = threadIdx.x; e < kDepth * kCols; e += kThreads) {
      const int k = e / kCols, c = e % kCols;
      const int64_t g = k0 + k, gc = col0 + c;
      panel[k * kLd + c] =
          (g < n && gc < d) ? from_float<In>(to_float(src[g * d + gc]) * inv[g]) : from_float<In>(0.f);
    }
  }
}

// c[z] (strip x d, fp32) = g_strip[:, z's K range] @ unit rows of src over
// that range; blockIdx = (128-row block of the strip, 64-column block of d,
// K split z). The K ranges are multiples of kDepth inside [0, ld); an empty
// one writes zeros, so the finishing kernel may sum every split.
template <typename In, bool TC>
__global__ void __launch_bounds__(kThreads)
    strip_gemm_kernel(const In* g_strip, int64_t ld, int64_t strip, const In* src,
                      const float* src_inv, int64_t n, int64_t d, bool vec, int64_t k_per_split,
                      float* c) {
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  constexpr int kLdA = kLdStage<In>, kWidth = kVecWidth<In>;
  In* as = reinterpret_cast<In*>(smem);
  In* panel = as + kRows * kLdA;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t k_end = min(ld, k_begin + k_per_split);
  TileAccumulator<In, TC> acc;
  acc.zero();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kDepth) {
    // The strip is allocated whole (ld % 128 == 0): no bounds to check.
    constexpr int kVecsPerRow = kDepth / kWidth;
    for (int e = threadIdx.x; e < kRows * kVecsPerRow; e += kThreads) {
      const int r = e / kVecsPerRow, k = (e % kVecsPerRow) * kWidth;
      *reinterpret_cast<uint4*>(as + r * kLdA + k) =
          *reinterpret_cast<const uint4*>(g_strip + (r0 + r) * ld + k0 + k);
    }
    stage_unit_rows(src, src_inv, n, d, k0, col0, vec, panel);
    __syncthreads();
    acc.stage_product(as, panel);
    __syncthreads();
  }
  acc.store(reinterpret_cast<float*>(smem));
  __syncthreads();
  const float* tile = reinterpret_cast<const float*>(smem);
  float* out = c + static_cast<int64_t>(blockIdx.z) * strip * d;
  for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
    const int r = e / kCols, col = e % kCols;
    if (col0 + col < d) out[(r0 + r) * d + col0 + col] = tile[r * kLdTile + col];
  }
}

template <typename In>
bool vector_loads(const Params<In>& p) {
  return rows_are_16b_aligned(p.x, p.d, sizeof(In)) && rows_are_16b_aligned(p.y, p.d, sizeof(In));
}

unsigned grid_side(int64_t value, const char* what) {
  if (value < 1 || value > 2147483647LL) {
    throw std::invalid_argument(std::string("clipfast._cuda: grid side out of range for ") + what +
                                ": " + std::to_string(value));
  }
  return static_cast<unsigned>(value);
}

}  // namespace

namespace {

template <typename In, bool TC>
void forward_tiles_on(const Params<In>& p, const Stats& s, const Workspace& w,
                      cudaStream_t stream) {
  const int64_t row_per = ceil_div(ceil_div(p.n, kRows), w.row_splits);
  const int64_t col_per = ceil_div(ceil_div(p.n, kCols), w.col_splits);
  dim3 grid(grid_side(w.row_splits, "row splits"), grid_side(w.col_splits, "column splits"));
  forward_tiles_kernel<In, TC><<<grid, kThreads, 0, stream>>>(
      p, vector_loads(p), row_per, col_per, w.row_max_part, w.row_sum_part, w.col_max_part,
      w.col_sum_part, s.diag);
  check_launch("forward_tiles_kernel");
}

template <typename In, bool TC>
void backward_on(const Params<In>& p, const Stats& s, float factor, const float* coef,
                 const StripWorkspace<In>& w, bool need_scale, In* grad_x, In* grad_y,
                 cudaStream_t stream) {
  const int64_t n = p.n, d = p.d;
  const bool vec = vector_loads(p);
  const int64_t strips = ceil_div(n, w.strip);
  const int64_t k_per_split = ceil_div(ceil_div(w.ld, w.k_splits), kDepth) * kDepth;
  const dim3 gemm_grid(grid_side(w.strip / kRows, "strip rows"),
                       grid_side(ceil_div(d, kCols), "feature columns"),
                       grid_side(w.k_splits, "K splits"));
  const int64_t part_stride = w.strip * d;

  if (need_scale || grad_x != nullptr) {
    const dim3 grid(grid_side(w.ld / kCols, "columns"), grid_side(w.strip / kRows, "strip rows"));
    for (int64_t t = 0; t < strips; ++t) {
      const int64_t s0 = t * w.strip, rows = std::min(w.strip, n - s0);
      grad_strip_kernel<In, TC, true><<<grid, kThreads, 0, stream>>>(
          p, s, vec, s0, w.ld, w.g_strip, need_scale ? w.scale_part : nullptr);
      check_launch("grad_strip_kernel (rows)");
      if (need_scale) {
        sum_kernel<<<1, kThreads, 0, stream>>>(w.scale_part,
                                               static_cast<int64_t>(grid.x) * grid.y,
                                               w.scale_acc + t);
        check_launch("sum_kernel (scale gradient)");
      }
      if (grad_x != nullptr) {
        strip_gemm_kernel<In, TC><<<gemm_grid, kThreads, 0, stream>>>(
            w.g_strip, w.ld, w.strip, p.y, p.inv_y, n, d, vec, k_per_split, w.c_strip);
        check_launch("strip_gemm_kernel (image)");
        launch_finish<In>(w.c_strip, w.k_splits, part_stride, p.x + s0 * d, p.inv_x + s0, rows,
                          d, factor, coef, p.normalize, grad_x + s0 * d, stream,
                          "finish_kernel (image strip)");
      }
    }
  }
  if (grad_y != nullptr) {
    const dim3 grid(grid_side(w.ld / kRows, "rows"), grid_side(w.strip / kCols, "strip columns"));
    for (int64_t t = 0; t < strips; ++t) {
      const int64_t s0 = t * w.strip, rows = std::min(w.strip, n - s0);
      grad_strip_kernel<In, TC, false><<<grid, kThreads, 0, stream>>>(p, s, vec, s0, w.ld,
                                                                      w.g_strip, nullptr);
      check_launch("grad_strip_kernel (columns)");
      strip_gemm_kernel<In, TC><<<gemm_grid, kThreads, 0, stream>>>(
          w.g_strip, w.ld, w.strip, p.x, p.inv_x, n, d, vec, k_per_split, w.c_strip);
      check_launch("strip_gemm_kernel (text)");
      launch_finish<In>(w.c_strip, w.k_splits, part_stride, p.y + s0 * d, p.inv_y + s0, rows, d,
                        factor, coef, p.normalize, grad_y + s0 * d, stream,
                        "finish_kernel (text strip)");
    }
  }
}

// fp16/bf16 always run on tensor cores; fp32 on TF32 ones or IEEE FMAs.
template <typename In>
bool use_fma(bool tensor_cores) {
  return std::is_same_v<In, float> && !tensor_cores;
}

}  // namespace

template <typename In>
void forward_tiles(const Params<In>& p, const Stats& s, const Workspace& w, bool tensor_cores,
                   cudaStream_t stream) {
  if constexpr (std::is_same_v<In, float>) {
    if (use_fma<In>(tensor_cores)) return forward_tiles_on<In, false>(p, s, w, stream);
  }
  forward_tiles_on<In, true>(p, s, w, stream);
}

template <typename In>
void backward(const Params<In>& p, const Stats& s, float factor, const float* coef,
              const StripWorkspace<In>& w, bool tensor_cores, bool need_scale, In* grad_x,
              In* grad_y, cudaStream_t stream) {
  if (w.strip < kRows || w.strip % kRows != 0 || w.ld < p.n || w.ld % kRows != 0 ||
      w.k_splits < 1) {
    throw std::invalid_argument(
        "clipfast._cuda: strip workspace needs strip and ld multiples of 128, ld >= n and "
        "k_splits >= 1; got strip=" + std::to_string(w.strip) + ", ld=" + std::to_string(w.ld) +
        ", n=" + std::to_string(p.n) + ", k_splits=" + std::to_string(w.k_splits));
  }
  if constexpr (std::is_same_v<In, float>) {
    if (use_fma<In>(tensor_cores))
      return backward_on<In, false>(p, s, factor, coef, w, need_scale, grad_x, grad_y, stream);
  }
  backward_on<In, true>(p, s, factor, coef, w, need_scale, grad_x, grad_y, stream);
}

#define CLIPFAST_INSTANTIATE_TILES(In)                                                        \
  template void forward_tiles<In>(const Params<In>&, const Stats&, const Workspace&, bool,    \
                                  cudaStream_t);                                              \
  template void backward<In>(const Params<In>&, const Stats&, float, const float*,           \
                             const StripWorkspace<In>&, bool, bool, In*, In*, cudaStream_t);
CLIPFAST_INSTANTIATE_TILES(float)
CLIPFAST_INSTANTIATE_TILES(__half)
CLIPFAST_INSTANTIATE_TILES(__nv_bfloat16)

}  // namespace cuda
}  // namespace clipfast
