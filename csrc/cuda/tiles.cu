// Tile kernels of the CUDA backend: the forward sweep, the backward's
// recomputation of G by square panels and the panels' two products, each in
// one of two arithmetic engines (TileAccumulator): tensor cores (fp16 / bf16:
// ldmatrix + mma.sync.m16n8k16 in inline PTX; fp32: TF32 WMMA 16 x 16 x 8
// fragments) or IEEE fp32 FMAs, always accumulating in fp32. The per-element
// math is tile_math.h's, as on the CPU. The CPU emulation (csrc/emulate) runs
// all of it, PTX included (CLIPFAST_CUDA_EMULATION).
//
// Main loop (product_tile): 128 x 128 output tiles for 256 threads (8 warps
// of 64 x 32 outputs, or 16 x 16 threads of 8 x 8), K in stages of 64 bytes
// per row (32 fp16/bf16 or 16 fp32 values) through a 3-stage cp.async
// pipeline: two stages are in flight while the tensor cores consume the
// third, one barrier per stage. Staged rows are padded by 16 bytes (80-byte
// rows of K, 272 / 528-byte rows of M or N), so the 8 row addresses of an
// ldmatrix phase hit 8 distinct 16-byte bank groups (no bank conflicts). Per
// stage and warp (fp16/bf16): 12 ldmatrix.x4, 32 mma.sync, 4 cp.async of 16
// bytes per thread. The fp32 output tile of the epilogue takes the stages'
// place once they are drained: 66 KB of dynamic shared memory per block;
// fp16/bf16 kernels fit in 128 registers, so 2 blocks (16 warps) share an SM.
//
// Forward: a ROW_SPLITS x COL_SPLITS grid of super-tiles, the row statistics
// in shared memory across a block's columns, the column statistics in the
// block's private slice of a (ROW_SPLITS, N) partial buffer (no atomics),
// merged afterwards. Every pass computes a tile's dot products with the same
// function (tile_dots) from the same 128-aligned origin, so the backward's
// logits equal the forward's bit for bit.
//
// Backward by square panels of G (p x p, p a multiple of 128), in a fixed
// order (row panel I outer, column panel J inner):
//   grad_panel_kernel      G_IJ = P + Q - 2[i==j] (in In: values in [-2, 2])
//                          recomputed once, plus the scale-gradient partials;
//   panel_products_kernel  one launch, two kinds of tiles:
//                          dX^[I] += G_IJ Y^[J]   (fp32 x_acc, p x d)
//                          dY^[J] += G_IJ^T X^[I] (grad_y itself, see below);
//   finish (per row panel) the normalisation backward of dX^[I] into grad_x;
//   finish (at the end)    the same for dY^, in place in grad_y.
// Work: forward 2 N^2 d FLOPs, backward 6 N^2 d (G once, two products):
// 8 N^2 d in all, the four-GEMM floor. Y^ / X^ are the unit rows, scaled by
// the inverse norms in shared memory after they land (rounded to In, as a
// normalised copy would be).
//
// SigLIP runs on the same engine with its own epilogues: siglip_forward_kernel
// sums -logsigmoid(z L) over super-tiles (per-block partials, no statistics),
// and grad_panel_kernel takes the loss as a Panel functor (ClipPanel: weights
// from the softmax statistics; SiglipPanel: -z sigmoid(-z L), plus the bias
// gradient's sum), so the panel products and finishes are CLIP's, unchanged.
//
// dY^ accumulates over the row panels in place: for float in grad_y (fp32);
// for bf16 as a 20-bit float (sign, 8-bit exponent, 11-bit mantissa), for
// fp16 as a 24-bit one (15-bit mantissa), the top 16 bits of the fp32 pattern
// in grad_y's own storage and the next 4 (bf16: y_lo is n x ceil(d/2) bytes)
// or 8 (fp16: n x d bytes) in y_lo, rounded to nearest at each of the
// ceil(N / p) updates (see kLoBits). Extra memory of a 16-bit backward beyond
// the inputs and their gradients (4 N d bytes):
//   N * ceil(d/2) (bf16) or N * d (fp16)   y_lo
//   + 2 p^2                  g_panel
//   + 4 p d                  x_acc
//   + 4 (p/128)^2 + 4 ceil(N/p)^2 + O(N) fp32 statistics,
// with p a multiple of 128 (<= N rounded up) where 2 p^2 + 4 p d <=
// max(3 N d / 8, 32 MiB), chosen among those to fill whole rounds of blocks
// (clipfast/cuda_backend.py: panel_plan). At N = 131072, d = 1024 (p = 4096):
// bf16: 512 + 64 + 32 + 16 + 3.5 MiB = 1.23x the gradients' 512 MiB, the
// gradients included (target: 1.25x); fp16: 512 + 128 + ... = 1.35x.
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "clipfast/siglip_math.h"
#include "clipfast/tile_math.h"
#include "cuda/clip_loss_cuda.h"
#include "cuda/common.cuh"
#include "cuda/siglip_cuda.h"

namespace clipfast {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 128;          // output tile rows and columns
constexpr int kThreads = 256;       // 8 warps, 2 (rows) x 4 (columns)
constexpr int kStages = 3;          // cp.async pipeline depth
constexpr int kFrag = 16;           // WMMA fragment rows and columns
constexpr int kWarpRows = 64, kWarpCols = 32;
constexpr int kLdTile = kTile + 4;  // fp32 output tile rows
static_assert(kTileRows == kTile && kTileCols == kTile && kPanelAlign == kTile, "square tiles");
static_assert(2 * kWarpRows == kTile && 4 * kWarpCols == kTile, "8 warps as 2 x 4");

// fp32 on tensor cores: TF32 WMMA fragments (16 x 16 x 8), rounded to 10-bit
// mantissas, fp32 accumulation, as torch's matmul does under allow_tf32.
constexpr int kTf32K = 8;

constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

// Blocks per SM the register allocation must allow: fp16 / bf16 tiles fit
// in 128 registers (2 x 256 threads per SM, with 2 x 66 KB of shared memory);
// the fp32 engines (TF32 WMMA fragments, 8 x 8 FMA outputs) take more.
template <typename In>
constexpr int kMinBlocks = sizeof(In) == 2 ? 2 : 1;

template <typename In>
constexpr int kVec = 16 / sizeof(In);         // elements per 16-byte vector (cp.async)
template <typename In>
constexpr int kDepth = 64 / sizeof(In);       // K of one stage: 64 bytes per row
template <typename In>
constexpr int kLdK = kDepth<In> + kVec<In>;   // [mn][k] staging: 80-byte rows
template <typename In>
constexpr int kLdMN = kTile + kVec<In>;       // [k][mn] staging: 272 / 528-byte rows
template <typename In>
constexpr int kOperandElems = static_cast<int>(cmax(kTile * kLdK<In>, kDepth<In> * kLdMN<In>));
template <typename In>
constexpr int kStageElems = 2 * kOperandElems<In>;  // A then B
template <typename In>
constexpr size_t kSmemBytes = cmax(kStages * kStageElems<In> * sizeof(In),
                                   kTile * kLdTile * sizeof(float));
static_assert(kSmemBytes<__half> == 67584 && kSmemBytes<float> == 67584, "66 KB per block");
static_assert((kFrag * kLdK<__half> * 2) % 32 == 0 && (kFrag * kLdK<float> * 4) % 32 == 0 &&
                  (kStageElems<__half> * 2) % 128 == 0 && (kOperandElems<float> * 4) % 128 == 0,
              "WMMA fragment pointers stay 32-byte aligned");

// How a staged operand maps its source rows: kRows, the operand's M (or N)
// index is the source row and K runs along it, staged [mn][k] (kLdK); kCols,
// K is the source row and M (or N) runs along it, staged [k][mn] (kLdMN).
enum class Shape { kRows, kCols };

// A row-major source matrix, zeros past (rows, cols); the tile's origin at
// K = 0. With inv not null, kCols unit rows are scaled by inv[source row],
// and kRows rows by huge_row_scale(inv[source row]) (tile_math.h: only huge
// rows, by a power of two, so that their dot products cannot overflow).
template <typename In>
struct Operand {
  const In* src;
  int64_t ld, rows, cols;
  int64_t row0, col0;
  const float* inv;
  bool vec;  // 16-byte aligned rows and cols % kVec == 0: cp.async
};

template <typename In, Shape S>
struct StageGeometry {
  static constexpr int kSrcRows = S == Shape::kRows ? kTile : kDepth<In>;
  static constexpr int kSrcCols = S == Shape::kRows ? kDepth<In> : kTile;
  static constexpr int kLd = S == Shape::kRows ? kLdK<In> : kLdMN<In>;
  static constexpr int kChunksPerRow = kSrcCols / kVec<In>;
  static constexpr int kChunks = kSrcRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "whole 16-byte chunks per thread");
};

// This thread's chunks (16 bytes of a source row: kVec elements) of every
// stage of one operand, set up once per tile so that the main loop carries
// one pointer and one bound per chunk. Stages are issued in K order.
template <typename In, Shape S>
struct StageCursor {
  using G = StageGeometry<In, S>;
  static constexpr int kPer = G::kChunks / kThreads;
  const In* src[kPer];  // the chunk's source at the next stage to issue
  int room[kPer];       // the chunk is inside the source while k0 < room
  int width[kPer];      // kCols: elements of the chunk inside the source columns
  int64_t step;         // source elements from one stage to the next
  const float* inv;     // inv + row0 (null: rows as they are); see Operand
  bool vec;

  // Rows are huge only in fp32 and bf16: fp16's largest row norm, 65504
  // sqrt(d), is far below 2^32.
  static constexpr bool kScalesRows = S == Shape::kRows && !std::is_same<In, __half>::value;

  __device__ static int chunk_row(int c) { return (threadIdx.x + c * kThreads) / G::kChunksPerRow; }
  __device__ static int chunk_col(int c) {
    return ((threadIdx.x + c * kThreads) % G::kChunksPerRow) * kVec<In>;
  }
  __device__ static int clamp_room(int64_t extent) {
    return extent <= 0 ? 0 : extent >= 0x7fffffff ? 0x7fffffff : static_cast<int>(extent);
  }

  __device__ explicit StageCursor(const Operand<In>& o)
      : step(S == Shape::kRows ? kDepth<In> : kDepth<In> * o.ld),
        inv((S == Shape::kCols || kScalesRows) && o.inv != nullptr ? o.inv + o.row0 : nullptr),
        vec(o.vec) {
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t gr = o.row0 + chunk_row(c), gc = o.col0 + chunk_col(c);
      src[c] = o.src + gr * o.ld + gc;
      if (S == Shape::kRows) {  // K runs along the source row
        room[c] = gr < o.rows ? clamp_room(o.cols - gc) : 0;
        width[c] = kVec<In>;
      } else {  // K runs down the source rows
        const int w = clamp_room(o.cols - gc);
        room[c] = w > 0 ? clamp_room(o.rows - gr) : 0;
        width[c] = w < kVec<In> ? w : kVec<In>;
      }
    }
  }

  // Stage k0 into dst: cp.async for vector rows (a 16-byte chunk is wholly
  // inside or outside the source), else element loads (already scaled).
  __device__ void issue(int k0, In* dst) {
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      In* to = dst + chunk_row(c) * G::kLd + chunk_col(c);
      if (vec) {
        cp_async16(to, src[c], k0 < room[c]);
      } else {
        for (int t = 0; t < kVec<In>; ++t) {
          const bool inside = S == Shape::kRows ? k0 + t < room[c] : k0 < room[c] && t < width[c];
          In v = from_float<In>(0.f);
          if (inside) {
            v = src[c][t];
            if (S == Shape::kCols && inv != nullptr)
              v = from_float<In>(to_float(v) * inv[k0 + chunk_row(c)]);
            if (kScalesRows && inv != nullptr)
              v = from_float<In>(to_float(v) * huge_row_scale(inv[chunk_row(c)]));
          }
          to[t] = v;
        }
      }
      src[c] += step;
    }
  }

  // Once this thread's copies of stage k0 have landed (visible to it without
  // a barrier): scales the unit rows (or huge rows) among its own chunks.
  __device__ void land(int k0, In* dst) const {
    if constexpr (S == Shape::kCols || kScalesRows) {
      if (!vec || inv == nullptr) return;
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        if (k0 < room[c]) {
          const float scale = S == Shape::kCols ? inv[k0 + chunk_row(c)]
                                                : huge_row_scale(inv[chunk_row(c)]);
          In* q = dst + chunk_row(c) * G::kLd + chunk_col(c);
#pragma unroll
          for (int t = 0; t < kVec<In>; ++t) q[t] = from_float<In>(to_float(q[t]) * scale);
        }
      }
    }
  }
};

template <typename In, Shape S>
__device__ __forceinline__ const In* operand_at(const In* base, int mn, int k) {
  return S == Shape::kRows ? base + mn * kLdK<In> + k : base + k * kLdMN<In> + mn;
}

// This thread's share of a 128 x 128 fp32 product tile. Tensor cores (TC):
// each warp 64 x 32 outputs; fp16 / bf16 as 4 x 4 mma.sync.m16n8k16 tiles
// fed by ldmatrix, fp32 as 4 x 2 TF32 WMMA fragments. Otherwise IEEE fp32
// FMAs, each thread 8 x 8 outputs, k in ascending order. Either way the same
// engine computes a tile in every pass, so recomputed logits are identical.
template <typename In, bool TC>
struct TileAccumulator;

template <typename In>
struct TileAccumulator<In, true> {
  static_assert(sizeof(In) == 2, "fp16 / bf16 on mma.sync");
  float c[4][4][4];  // [m16 tile][n8 tile][PTX accumulator fragment]

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[i][j][e] = 0.f;
  }
  // acc += A B over one stage: A (M x K) staged by SA, B (K x N) by SB (a
  // kRows B holds N's rows, i.e. B column-major). Per k16 step: 4 ldmatrix.x4
  // for A (one per m16 tile), 2 for B (two n8 tiles each), 16 mma.sync.
  template <Shape SA, Shape SB>
  __device__ void compute(const In* a, const In* b) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = (warp / 4) * kWarpRows, wn = (warp % 4) * kWarpCols;
    const int q = lane / 8, i = lane % 8;  // this lane's matrix and row address
#pragma unroll
    for (int kk = 0; kk < kDepth<In>; kk += 16) {
      const void* pa[4];
      const void* pb[2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // Matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15).
        const int m = wm + mi * 16 + (q % 2) * 8, k = kk + (q / 2) * 8;
        pa[mi] = SA == Shape::kRows ? a + (m + i) * kLdK<In> + k : a + (k + i) * kLdMN<In> + m;
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        // Two n8 tiles each: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
        const int n = wn + nj * 16 + (q / 2) * 8, k = kk + (q % 2) * 8;
        pb[nj] = SB == Shape::kRows ? b + (n + i) * kLdK<In> + k : b + (k + i) * kLdMN<In> + n;
      }
      uint32_t fa[4][4], rb[2][4];
      ldmatrix_x4_step<SA == Shape::kCols, SB == Shape::kCols>(fa, pa, rb, pb);
      uint32_t fb[4][2];
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        fb[2 * nj][0] = rb[nj][0];
        fb[2 * nj][1] = rb[nj][1];
        fb[2 * nj + 1][0] = rb[nj][2];
        fb[2 * nj + 1][1] = rb[nj][3];
      }
      mma_16816_tiles<In>(c, fa, fb);
    }
  }
  __device__ void store(float* tile) const {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = (warp / 4) * kWarpRows, wn = (warp % 4) * kWarpCols;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        float* at = tile + (wm + mi * 16 + g) * kLdTile + wn + nj * 8 + 2 * t;
        at[0] = c[mi][nj][0];
        at[1] = c[mi][nj][1];
        at[8 * kLdTile] = c[mi][nj][2];
        at[8 * kLdTile + 1] = c[mi][nj][3];
      }
  }
};

using Tf32Accumulator = wmma::fragment<wmma::accumulator, kFrag, kFrag, kTf32K, float>;

template <>
struct TileAccumulator<float, true> {
  Tf32Accumulator frag[4][2];

  __device__ void zero() {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(frag[i][j], 0.f);
  }
  template <typename Fragment>
  __device__ static void round(Fragment& f) {
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
  }
  template <Shape SA, Shape SB>
  __device__ void compute(const float* a, const float* b) {
    using LA = std::conditional_t<SA == Shape::kRows, wmma::row_major, wmma::col_major>;
    using LB = std::conditional_t<SB == Shape::kRows, wmma::col_major, wmma::row_major>;
    constexpr unsigned lda = SA == Shape::kRows ? kLdK<float> : kLdMN<float>;
    constexpr unsigned ldb = SB == Shape::kRows ? kLdK<float> : kLdMN<float>;
    const int warp = threadIdx.x / 32, warp_row = warp / 4, warp_col = warp % 4;
#pragma unroll
    for (int kk = 0; kk < kDepth<float>; kk += kTf32K) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kTf32K, wmma::precision::tf32, LA> fa[4];
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kTf32K, wmma::precision::tf32, LB> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wmma::load_matrix_sync(fa[i], operand_at<float, SA>(a, warp_row * kWarpRows + i * kFrag, kk), lda);
        round(fa[i]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], operand_at<float, SB>(b, warp_col * kWarpCols + j * kFrag, kk), ldb);
        round(fb[j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(frag[i][j], fa[i], fb[j], frag[i][j]);
    }
  }
  __device__ void store(float* tile) const {
    const int warp = threadIdx.x / 32, warp_row = warp / 4, warp_col = warp % 4;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(tile + (warp_row * kWarpRows + i * kFrag) * kLdTile +
                                    warp_col * kWarpCols + j * kFrag,
                                frag[i][j], kLdTile, wmma::mem_row_major);
  }
};

template <typename In>
struct TileAccumulator<In, false> {
  static constexpr int kPer = kTile / 16;  // 8 x 8 outputs per thread
  float value[kPer][kPer];

  __device__ int row0() const { return (threadIdx.x / 16) * kPer; }
  __device__ int col0() const { return (threadIdx.x % 16) * kPer; }
  __device__ void zero() {
    for (int i = 0; i < kPer; ++i)
      for (int j = 0; j < kPer; ++j) value[i][j] = 0.f;
  }
  template <Shape SA, Shape SB>
  __device__ void compute(const In* a, const In* b) {
    const int r0 = row0(), c0 = col0();
    for (int k = 0; k < kDepth<In>; ++k) {
      float av[kPer], bv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) av[i] = to_float(*operand_at<In, SA>(a, r0 + i, k));
#pragma unroll
      for (int j = 0; j < kPer; ++j) bv[j] = to_float(*operand_at<In, SB>(b, c0 + j, k));
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) value[i][j] = fmaf(av[i], bv[j], value[i][j]);
    }
  }
  __device__ void store(float* tile) const {
    const int r0 = row0(), c0 = col0();
    for (int i = 0; i < kPer; ++i)
      for (int j = 0; j < kPer; ++j) tile[(r0 + i) * kLdTile + c0 + j] = value[i][j];
  }
};
static_assert(kThreads == 256, "16 x 16 FMA threads");

// acc = A B over K = [0, k_len) through the kStages-deep cp.async pipeline,
// then the fp32 tile in `smem` (row stride kLdTile). The caller must have
// synchronised the block since it last used smem.
template <typename In, bool TC, Shape SA, Shape SB>
__device__ void product_tile(const Operand<In>& a, const Operand<In>& b, int64_t k_len,
                             unsigned char* smem) {
  In* stages = reinterpret_cast<In*>(smem);
  auto a_at = [&](int kt) { return stages + (kt % kStages) * kStageElems<In>; };
  auto b_at = [&](int kt) { return a_at(kt) + kOperandElems<In>; };
  const int k_tiles = static_cast<int>(ceil_div(k_len, kDepth<In>));
  StageCursor<In, SA> ca(a);
  StageCursor<In, SB> cb(b);
  TileAccumulator<In, TC> acc;
  acc.zero();
  for (int kt = 0; kt < kStages - 1; ++kt) {
    if (kt < k_tiles) {
      ca.issue(kt * kDepth<In>, a_at(kt));
      cb.issue(kt * kDepth<In>, b_at(kt));
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's copies of stage kt have landed
    ca.land(kt * kDepth<In>, a_at(kt));
    cb.land(kt * kDepth<In>, b_at(kt));
    __syncthreads();  // everyone's stage kt is visible; stage kt - 1 is consumed
    const int next = kt + kStages - 1;
    if (next < k_tiles) {
      ca.issue(next * kDepth<In>, a_at(next));
      cb.issue(next * kDepth<In>, b_at(next));
    }
    cp_async_commit();
    acc.template compute<SA, SB>(a_at(kt), b_at(kt));
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages are dead: the tile takes their place
  acc.store(reinterpret_cast<float*>(smem));
  __syncthreads();
}

// Dot products of rows [row0, row0 + 128) of X with rows [col0, col0 + 128)
// of Y into the fp32 tile at the start of smem. Rows past n give 0. A side
// holding a huge row (tile_math.h) is read scaled by huge_row_scale, so the
// products stay in range; the logits then take tile_inv_norm. Every pass
// decides alike for a tile, so recomputed logits still match bit for bit.
template <typename In, bool TC>
__device__ void tile_dots(const Params<In>& p, bool vec, int64_t row0, int64_t col0,
                          unsigned char* smem) {
  bool huge_x = false, huge_y = false;
  if constexpr (!std::is_same<In, __half>::value) {
    static_assert(kThreads == 2 * kTile, "one thread per row of each side");
    const int64_t r = (threadIdx.x < kTile ? row0 : col0 - kTile) + threadIdx.x;
    const float* inv = threadIdx.x < kTile ? p.inv_x : p.inv_y;
    const bool huge = r < p.n && is_huge_row(inv[r]);
    huge_x = __syncthreads_or(huge && threadIdx.x < kTile) != 0;
    huge_y = __syncthreads_or(huge && threadIdx.x >= kTile) != 0;
  }
  const Operand<In> xs{p.x, p.d, p.n, p.d, row0, 0, huge_x ? p.inv_x : nullptr, vec};
  const Operand<In> ys{p.y, p.d, p.n, p.d, col0, 0, huge_y ? p.inv_y : nullptr, vec};
  product_tile<In, TC, Shape::kRows, Shape::kRows>(xs, ys, p.d, smem);
}

// The forward sweep of one super-tile: row statistics in shared memory
// across the block's columns, column statistics in the block's private slice
// of the (row_splits, n) partials, the label logits from the same tiles.
template <typename In, bool TC>
__global__ void __launch_bounds__(kThreads, kMinBlocks<In>)
    forward_tiles_kernel(Params<In> p, bool vec, int64_t row_blocks_per_split,
                         int64_t col_blocks_per_split, float* row_max_part, float* row_sum_part,
                         float* col_max_part, float* col_sum_part, float* diag) {
  CLIPFAST_DYNAMIC_SHARED(smem);
  __shared__ float row_max[kTile], row_sum[kTile];
  float* tile = reinterpret_cast<float*>(smem);
  const int64_t n = p.n;
  const int64_t blocks = ceil_div(n, kTile);
  const int64_t rb0 = blockIdx.x * row_blocks_per_split;
  const int64_t rb1 = min(blocks, rb0 + row_blocks_per_split);
  const int64_t cb0 = blockIdx.y * col_blocks_per_split;
  const int64_t cb1 = min(blocks, cb0 + col_blocks_per_split);
  float* my_col_max = col_max_part + static_cast<int64_t>(blockIdx.x) * n;
  float* my_col_sum = col_sum_part + static_cast<int64_t>(blockIdx.x) * n;

  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const int64_t row0 = rb * kTile;
    if (threadIdx.x < kTile) {
      row_max[threadIdx.x] = -INFINITY;
      row_sum[threadIdx.x] = 0.f;
    }
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t col0 = cb * kTile;
      tile_dots<In, TC>(p, vec, row0, col0, smem);
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int r = e / kTile, c = e % kTile;
        const int64_t gi = row0 + r, gj = col0 + c;
        float* entry = tile + r * kLdTile + c;
        float cosine;
        *entry = (gi < n && gj < n)
                     ? pair_logit<float>(*entry, tile_inv_norm(p.inv_x[gi]), tile_inv_norm(p.inv_y[gj]),
                                         p.scale, p.bias, &cosine)
                     : -INFINITY;
      }
      __syncthreads();
      // Rows and columns: 2 lanes per line, interleaved halves.
      const int line = threadIdx.x / 2, part = threadIdx.x % 2;
      {
        float m, s;
        lse_of_line(tile + line * kLdTile + part, kTile / 2, 2, m, s);
        lse_merge_lanes(m, s, 2);
        if (part == 0 && row0 + line < n) lse_merge(row_max[line], row_sum[line], m, s);
      }
      {
        float m, s;
        lse_of_line(tile + part * kLdTile + line, kTile / 2, 2 * kLdTile, m, s);
        lse_merge_lanes(m, s, 2);
        const int64_t gj = col0 + line;
        if (part == 0 && gj < n) lse_merge(my_col_max[gj], my_col_sum[gj], m, s);
      }
      if (threadIdx.x < kTile) {  // the label logit, from the tile the statistics saw
        const int64_t gi = row0 + threadIdx.x;
        if (gi < n && gi >= col0 && gi < col0 + kTile)
          diag[gi] = tile[threadIdx.x * kLdTile + (gi - col0)];
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

// SigLIP's forward over the super-tile of blockIdx (as forward_tiles_kernel
// splits the tiles): the block's sum of -logsigmoid(z L), z = +1 on (i, i)
// when `positives`, into loss_part[blockIdx.x * gridDim.y + blockIdx.y]. Each
// thread sums its terms in fp64 (they are all positive: fp32 sums of
// thousands would drift), the block in fp32.
template <typename In, bool TC>
__global__ void __launch_bounds__(kThreads, kMinBlocks<In>)
    siglip_forward_kernel(Params<In> p, bool positives, bool vec, int64_t row_blocks_per_split,
                          int64_t col_blocks_per_split, float* loss_part) {
  CLIPFAST_DYNAMIC_SHARED(smem);
  const float* tile = reinterpret_cast<const float*>(smem);
  const int64_t n = p.n;
  const int64_t blocks = ceil_div(n, kTile);
  const int64_t rb0 = blockIdx.x * row_blocks_per_split;
  const int64_t rb1 = min(blocks, rb0 + row_blocks_per_split);
  const int64_t cb0 = blockIdx.y * col_blocks_per_split;
  const int64_t cb1 = min(blocks, cb0 + col_blocks_per_split);
  double sum = 0.0;
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t row0 = rb * kTile, col0 = cb * kTile;
      tile_dots<In, TC>(p, vec, row0, col0, smem);
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int r = e / kTile, c = e % kTile;
        const int64_t gi = row0 + r, gj = col0 + c;
        if (gi < n && gj < n) {
          float cosine;
          const float logit =
              pair_logit<float>(tile[r * kLdTile + c], tile_inv_norm(p.inv_x[gi]),
                                tile_inv_norm(p.inv_y[gj]), p.scale, p.bias, &cosine);
          sum += siglip_pair_loss<float>(logit, positives && gi == gj);
        }
      }
      __syncthreads();  // the next tile's stages overwrite this one
    }
  }
  const float total = block_sum<kThreads>(static_cast<float>(sum));
  if (threadIdx.x == 0) loss_part[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = total;
}

// What a G panel holds, per loss: weight(logit, i, j) = c dloss/dL_ij for a
// constant c the finish multiplies out (factor * coef), stored in the panel
// as stored<In>(w). The panel kernel also sums w cos (the scale gradient)
// and, with kSums = 2, w itself (the bias gradient), per tile, in Sum.
struct ClipPanel {
  Stats s;
  static constexpr int kSums = 1;  // a softmax loss's bias gradient is exactly 0
  using Sum = float;
  // c = 2N: P + Q - 2[i==j], in [-2, 2].
  __device__ float weight(float logit, int64_t i, int64_t j) const {
    return grad_weight<float>(logit, s.row_max[i], s.row_logsum[i], s.col_max[j], s.col_logsum[j],
                              i == j);
  }
  template <typename In>
  static constexpr float kStoreScale = 1.f;
};

struct SiglipPanel {
  bool positives;
  static constexpr int kSums = 2;
  // The weights of the negatives share a sign: fp32 sums of 64 of them per
  // thread drift by ulps the plain reference's pairwise sums do not have.
  using Sum = double;
  // c = N: -z sigmoid(-z L), in [-1, 1].
  __device__ float weight(float logit, int64_t i, int64_t j) const {
    return siglip_grad_weight<float>(logit, positives && i == j);
  }
  // fp16 panels hold 2^14 w: most negatives' weights are near sigmoid(b)
  // (4.5e-5 at open_clip's b = -10), under fp16's smallest normal 6.1e-5,
  // where subnormals keep few bits; 2^14 |w| <= 16384 < 65504. A power of
  // two, divided out of the finish's factor exactly.
  template <typename In>
  static constexpr float kStoreScale = std::is_same_v<In, __half> ? 16384.f : 1.f;
};

// G of the panel rows [r0, ...) x columns [c0, ...), tile (blockIdx.x,
// blockIdx.y), into g[(i - r0) * ldg + (j - c0)] in the input dtype (zeros
// past n), and (sum_part not null) the tile's Panel::kSums partial sums
// (sum_ij w_ij cos_ij, then sum_ij w_ij) at sum_part[k * tiles + tile],
// tile = blockIdx.x * gridDim.y + blockIdx.y of tiles = gridDim.x * gridDim.y.
template <typename In, bool TC, typename Panel>
__global__ void __launch_bounds__(kThreads, kMinBlocks<In>)
    grad_panel_kernel(Params<In> p, Panel loss, bool vec, int64_t r0, int64_t c0, int64_t ldg,
                      In* g, float* sum_part) {
  CLIPFAST_DYNAMIC_SHARED(smem);
  const float* tile = reinterpret_cast<const float*>(smem);
  const int64_t n = p.n;
  const int64_t tr = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t tc = static_cast<int64_t>(blockIdx.y) * kTile;
  constexpr float kStore = Panel::template kStoreScale<In>;
  tile_dots<In, TC>(p, vec, r0 + tr, c0 + tc, smem);
  typename Panel::Sum scale_sum = 0, bias_sum = 0;
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t gi = r0 + tr + r, gj = c0 + tc + c;
    float w = 0.f;
    if (gi < n && gj < n) {
      float cosine;
      const float logit =
          pair_logit<float>(tile[r * kLdTile + c], tile_inv_norm(p.inv_x[gi]),
                            tile_inv_norm(p.inv_y[gj]), p.scale, p.bias, &cosine);
      w = loss.weight(logit, gi, gj);
      scale_sum += w * cosine;
      if constexpr (Panel::kSums == 2) bias_sum += w;
    }
    g[(tr + r) * ldg + tc + c] = from_float<In>(kStore == 1.f ? w : w * kStore);
  }
  if (sum_part != nullptr) {
    const int64_t tiles = static_cast<int64_t>(gridDim.x) * gridDim.y;
    const int64_t at = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
    const float total = block_sum<kThreads>(static_cast<float>(scale_sum));
    if (threadIdx.x == 0) sum_part[at] = total;
    if constexpr (Panel::kSums == 2) {
      __syncthreads();  // thread 0 has read block_sum's scratch
      const float bias_total = block_sum<kThreads>(static_cast<float>(bias_sum));
      if (threadIdx.x == 0) sum_part[tiles + at] = bias_total;
    }
  }
}

// The split dY^ accumulator: fp32 rounded to nearest after its top 16 + LO
// bits (NaN kept), stored as the top 16 bits and the next LO. bf16 keeps
// LO = 4 (20 bits: 11 mantissa bits against the output's 7); fp16, whose
// output has 10 mantissa bits, keeps LO = 8 (24 bits): with 4, the rounding
// at each of ceil(N/p) updates (32 at N = 131072) grew the error to 2.4x an
// fp32 accumulator's, past the tests' 2x rule.
template <typename In>
constexpr int kLoBits = std::is_same_v<In, __half> ? 8 : 4;
template <typename In>
constexpr int kLoPerByte = 8 / kLoBits<In>;
template <typename In>
__device__ __forceinline__ unsigned round_split(float v) {
  const unsigned bits = __float_as_uint(v);
  return v == v ? bits + (1u << (15 - kLoBits<In>)) : bits;
}
template <typename In>
__device__ __forceinline__ float from_split(uint16_t hi, unsigned lo) {
  return __uint_as_float((static_cast<unsigned>(hi) << 16) | (lo << (16 - kLoBits<In>)));
}

// The two products of one G panel (rows [r0, r0 + rows), columns
// [c0, c0 + cols); g holds g_rows x g_cols, whole tiles, zeros past n).
// Blocks [0, x_tiles): dX^ tiles (128 panel rows x 128 features),
// x_acc[i - r0][f] (=, or += unless x_first) (G Y^)[i][f]. The others: dY^
// tiles, dY^[j][f] (=, or += unless y_first) (G^T X^)[j][f], in grad_y's
// storage y_acc: fp32 for float, else the 20-bit split with y_lo (SPLIT).
template <typename In, bool TC, bool SPLIT>
__global__ void __launch_bounds__(kThreads, kMinBlocks<In>)
    panel_products_kernel(const In* g, int64_t ldg, int64_t g_rows, int64_t g_cols, int64_t rows,
                          int64_t cols, Params<In> p, bool vec, int64_t r0, int64_t c0,
                          int64_t x_tiles, float* x_acc, bool x_first, In* y_acc, uint8_t* y_lo,
                          bool y_first) {
  CLIPFAST_DYNAMIC_SHARED(smem);
  const float* tile = reinterpret_cast<const float*>(smem);
  const int64_t n = p.n, d = p.d;
  const int64_t d_tiles = ceil_div(d, kTile);
  int64_t t = blockIdx.x;
  const bool for_x = t < x_tiles;
  if (!for_x) t -= x_tiles;
  const int64_t m0 = (t / d_tiles) * kTile, f0 = (t % d_tiles) * kTile;
  if (for_x) {
    const Operand<In> a{g, ldg, g_rows, g_cols, m0, 0, nullptr, true};
    const Operand<In> b{p.y, d, n, d, c0, f0, p.normalize ? p.inv_y : nullptr, vec};
    product_tile<In, TC, Shape::kRows, Shape::kCols>(a, b, cols, smem);
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t i = m0 + r, f = f0 + c;
      if (i < rows && f < d) {
        const float v = tile[r * kLdTile + c];
        float& out = x_acc[i * d + f];
        out = x_first ? v : out + v;
      }
    }
    return;
  }
  const Operand<In> a{g, ldg, g_rows, g_cols, 0, m0, nullptr, true};
  const Operand<In> b{p.x, d, n, d, r0, f0, p.normalize ? p.inv_x : nullptr, vec};
  product_tile<In, TC, Shape::kCols, Shape::kCols>(a, b, rows, smem);
  if constexpr (SPLIT) {
    // kLoPerByte features per y_lo byte, all handled by one thread.
    constexpr int kLo = kLoBits<In>, kPer = kLoPerByte<In>;
    constexpr unsigned kMask = (1u << kLo) - 1u;
    uint16_t* hi = reinterpret_cast<uint16_t*>(y_acc);
    const int64_t ld_lo = (d + kPer - 1) / kPer;
    for (int e = threadIdx.x; e < kTile * kTile / kPer; e += kThreads) {
      const int r = e / (kTile / kPer), c = (e % (kTile / kPer)) * kPer;
      const int64_t j = c0 + m0 + r, f = f0 + c;
      if (j >= n || f >= d) continue;
      uint8_t& lo = y_lo[j * ld_lo + f / kPer];
      const unsigned old_lo = y_first ? 0u : lo;
      unsigned packed = 0;
      for (int h = 0; h < kPer && f + h < d; ++h) {
        float v = tile[r * kLdTile + c + h];
        if (!y_first) v = from_split<In>(hi[j * d + f + h], (old_lo >> (kLo * h)) & kMask) + v;
        const unsigned bits = round_split<In>(v);
        hi[j * d + f + h] = static_cast<uint16_t>(bits >> 16);
        packed |= ((bits >> (16 - kLo)) & kMask) << (kLo * h);
      }
      lo = static_cast<uint8_t>(packed);
    }
  } else {
    float* acc = reinterpret_cast<float*>(y_acc);
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t j = c0 + m0 + r, f = f0 + c;
      if (j < n && f < d) {
        const float v = tile[r * kLdTile + c];
        float& out = acc[j * d + f];
        out = y_first ? v : out + v;
      }
    }
  }
}

// The normalisation backward of the 20-bit dY^ accumulator, in place: reads
// hi (out's own storage, as 16-bit patterns) and y_lo, writes out in In. One
// warp per row; each element is read and then written by the same lane.
template <typename In>
__global__ void finish_split_kernel(const uint8_t* lo, const In* features, const float* inv_norm,
                                    int64_t rows, int64_t d, float factor, const float* coef,
                                    bool normalize, In* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const uint16_t* hi = reinterpret_cast<const uint16_t*>(out);
  constexpr int kLo = kLoBits<In>, kPer = kLoPerByte<In>;
  const int64_t ld_lo = (d + kPer - 1) / kPer;
  const float scaled = coef == nullptr ? factor : factor * *coef;
  auto grad_at = [&](int64_t k) {
    const unsigned low = (lo[row * ld_lo + k / kPer] >> (kLo * (k % kPer))) & ((1u << kLo) - 1u);
    return from_split<In>(hi[row * d + k], low) * scaled;
  };
  finish_row(grad_at, features + row * d, inv_norm[row], d, normalize, out + row * d);
}

// out[0] = sum of part[0:count], in a fixed order (deterministic).
__global__ void sum_kernel(const float* part, int64_t count, float* out) {
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) sum += part[i];
  const float total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) out[0] = total;
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

// More than 48 KB of dynamic shared memory must be asked for, per kernel;
// the largest shared-memory carveout lets two 66 KB blocks share an SM.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, const char* what) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               static_cast<int>(cudaSharedmemCarveoutMaxShared));
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("clipfast._cuda: launching ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

template <typename In, bool TC>
void forward_tiles_on(const Params<In>& p, const Stats& s, const Workspace& w,
                      cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.n, kTile);
  const int64_t row_per = ceil_div(blocks, w.row_splits);
  const int64_t col_per = ceil_div(blocks, w.col_splits);
  dim3 grid(grid_side(w.row_splits, "row splits"), grid_side(w.col_splits, "column splits"));
  allow_shared_memory(forward_tiles_kernel<In, TC>, kSmemBytes<In>, "forward_tiles_kernel");
  forward_tiles_kernel<In, TC><<<grid, kThreads, kSmemBytes<In>, stream>>>(
      p, vector_loads(p), row_per, col_per, w.row_max_part, w.row_sum_part, w.col_max_part,
      w.col_sum_part, s.diag);
  check_launch("forward_tiles_kernel");
}

template <typename In, bool TC>
void siglip_forward_tiles_on(const Params<In>& p, bool positives, const SiglipWorkspace& w,
                             cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.n, kTile);
  const int64_t row_per = ceil_div(blocks, w.row_splits);
  const int64_t col_per = ceil_div(blocks, w.col_splits);
  dim3 grid(grid_side(w.row_splits, "row splits"), grid_side(w.col_splits, "column splits"));
  allow_shared_memory(siglip_forward_kernel<In, TC>, kSmemBytes<In>, "siglip_forward_kernel");
  siglip_forward_kernel<In, TC><<<grid, kThreads, kSmemBytes<In>, stream>>>(
      p, positives, vector_loads(p), row_per, col_per, w.loss_part);
  check_launch("siglip_forward_kernel");
}

// The backward by panels for the loss `loss` (a Panel); sums (when
// need_sums) per panel into scale_acc and, for kSums = 2, bias_acc.
template <typename In, bool TC, typename Panel>
void backward_on(const Params<In>& p, const Panel& loss, float factor, const float* coef,
                 const PanelWorkspace<In>& w, bool need_sums, In* grad_x, In* grad_y,
                 cudaStream_t stream) {
  constexpr bool kSplit = !std::is_same_v<In, float>;
  const int64_t n = p.n, d = p.d, panel = w.panel;
  const bool vec = vector_loads(p);
  const int64_t panels = ceil_div(n, panel), d_tiles = ceil_div(d, kTile);
  constexpr size_t smem = kSmemBytes<In>;
  // The panels hold kStoreScale x the weights: the finishes divide it out.
  factor /= Panel::template kStoreScale<In>;
  float* const sum_acc[2] = {w.scale_acc, w.bias_acc};
  const char* const sum_name[2] = {"sum_kernel (scale gradient)", "sum_kernel (bias gradient)"};
  allow_shared_memory(grad_panel_kernel<In, TC, Panel>, smem, "grad_panel_kernel");
  allow_shared_memory(panel_products_kernel<In, TC, kSplit>, smem, "panel_products_kernel");

  for (int64_t ip = 0; ip < panels; ++ip) {
    const int64_t r0 = ip * panel, rows = std::min(panel, n - r0);
    const int64_t row_tiles = ceil_div(rows, kTile);
    for (int64_t jp = 0; jp < panels; ++jp) {
      const int64_t c0 = jp * panel, cols = std::min(panel, n - c0);
      const int64_t col_tiles = ceil_div(cols, kTile);
      const dim3 grid(grid_side(row_tiles, "panel rows"), grid_side(col_tiles, "panel columns"));
      grad_panel_kernel<In, TC, Panel><<<grid, kThreads, smem, stream>>>(
          p, loss, vec, r0, c0, panel, w.g_panel, need_sums ? w.scale_part : nullptr);
      check_launch("grad_panel_kernel");
      for (int k = 0; need_sums && k < Panel::kSums; ++k) {
        const int64_t tiles = row_tiles * col_tiles;
        sum_kernel<<<1, kThreads, 0, stream>>>(w.scale_part + k * tiles, tiles,
                                               sum_acc[k] + ip * panels + jp);
        check_launch(sum_name[k]);
      }
      const int64_t x_tiles = grad_x != nullptr ? row_tiles * d_tiles : 0;
      const int64_t y_tiles = grad_y != nullptr ? col_tiles * d_tiles : 0;
      if (x_tiles + y_tiles > 0) {
        const unsigned blocks = grid_side(x_tiles + y_tiles, "product tiles");
        panel_products_kernel<In, TC, kSplit><<<blocks, kThreads, smem, stream>>>(
                w.g_panel, panel, row_tiles * kTile, col_tiles * kTile, rows, cols, p, vec, r0,
                c0, x_tiles, w.x_acc, jp == 0, grad_y, w.y_lo, ip == 0);
        check_launch("panel_products_kernel");
      }
    }
    if (grad_x != nullptr) {
      launch_finish<In>(w.x_acc, 1, 0, p.x + r0 * d, p.inv_x + r0, rows, d, factor, coef,
                        p.normalize, grad_x + r0 * d, stream, "finish_kernel (image panel)");
    }
  }
  if (grad_y != nullptr) {
    if constexpr (kSplit) {
      constexpr int kRowsPerBlock = 8;
      const unsigned blocks = grid_side(ceil_div(n, kRowsPerBlock), "rows");
      finish_split_kernel<In><<<blocks, 32 * kRowsPerBlock, 0, stream>>>(
          w.y_lo, p.y, p.inv_y, n, d, factor, coef, p.normalize, grad_y);
      check_launch("finish_split_kernel (text)");
    } else {
      launch_finish<In>(grad_y, 1, 0, p.y, p.inv_y, n, d, factor, coef, p.normalize, grad_y,
                        stream, "finish_kernel (text)");
    }
  }
}

// fp16/bf16 always run on tensor cores; fp32 on TF32 ones or IEEE FMAs.
template <typename In>
bool use_fma(bool tensor_cores) {
  return std::is_same_v<In, float> && !tensor_cores;
}

template <typename In, typename Panel>
void panel_backward(const Params<In>& p, const Panel& loss, float factor, const float* coef,
                    const PanelWorkspace<In>& w, bool tensor_cores, bool need_sums, In* grad_x,
                    In* grad_y, cudaStream_t stream) {
  if (w.panel < kPanelAlign || w.panel % kPanelAlign != 0 || w.ld < p.n ||
      w.ld % kPanelAlign != 0 || w.panel > w.ld) {
    throw std::invalid_argument(
        "clipfast._cuda: panel workspace needs panel and ld multiples of 128, ld >= n and "
        "panel <= ld; got panel=" + std::to_string(w.panel) + ", ld=" + std::to_string(w.ld) +
        ", n=" + std::to_string(p.n));
  }
  if (grad_y != nullptr && !std::is_same_v<In, float> && w.y_lo == nullptr) {
    throw std::invalid_argument("clipfast._cuda: a 16-bit grad_y needs the y_lo plane");
  }
  if (grad_x != nullptr && w.x_acc == nullptr) {
    throw std::invalid_argument("clipfast._cuda: grad_x needs the x_acc buffer");
  }
  if (Panel::kSums == 2 && need_sums && w.bias_acc == nullptr) {
    throw std::invalid_argument("clipfast._cuda: the bias gradient needs the bias_acc buffer");
  }
  if constexpr (std::is_same_v<In, float>) {
    if (use_fma<In>(tensor_cores))
      return backward_on<In, false>(p, loss, factor, coef, w, need_sums, grad_x, grad_y, stream);
  }
  backward_on<In, true>(p, loss, factor, coef, w, need_sums, grad_x, grad_y, stream);
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
              const PanelWorkspace<In>& w, bool tensor_cores, bool need_scale, In* grad_x,
              In* grad_y, cudaStream_t stream) {
  panel_backward<In>(p, ClipPanel{s}, factor, coef, w, tensor_cores, need_scale, grad_x, grad_y,
                     stream);
}

template <typename In>
void siglip_forward_tiles(const Params<In>& p, bool positives, const SiglipWorkspace& w,
                          bool tensor_cores, cudaStream_t stream) {
  if constexpr (std::is_same_v<In, float>) {
    if (use_fma<In>(tensor_cores)) return siglip_forward_tiles_on<In, false>(p, positives, w, stream);
  }
  siglip_forward_tiles_on<In, true>(p, positives, w, stream);
}

template <typename In>
void siglip_backward(const Params<In>& p, bool positives, float factor, const float* coef,
                     const PanelWorkspace<In>& w, bool tensor_cores, bool need_sums, In* grad_x,
                     In* grad_y, cudaStream_t stream) {
  panel_backward<In>(p, SiglipPanel{positives}, factor, coef, w, tensor_cores, need_sums, grad_x,
                     grad_y, stream);
}

#define CLIPFAST_INSTANTIATE_TILES(In)                                                        \
  template void forward_tiles<In>(const Params<In>&, const Stats&, const Workspace&, bool,    \
                                  cudaStream_t);                                              \
  template void backward<In>(const Params<In>&, const Stats&, float, const float*,           \
                             const PanelWorkspace<In>&, bool, bool, In*, In*, cudaStream_t);   \
  template void siglip_forward_tiles<In>(const Params<In>&, bool, const SiglipWorkspace&, bool, \
                                         cudaStream_t);                                       \
  template void siglip_backward<In>(const Params<In>&, bool, float, const float*,            \
                                    const PanelWorkspace<In>&, bool, bool, In*, In*,          \
                                    cudaStream_t);
CLIPFAST_INSTANTIATE_TILES(float)
CLIPFAST_INSTANTIATE_TILES(__half)
CLIPFAST_INSTANTIATE_TILES(__nv_bfloat16)

}  // namespace cuda
}  // namespace clipfast
