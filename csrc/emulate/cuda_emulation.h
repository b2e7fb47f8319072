// A CPU emulation of the CUDA subset the backend's kernels use, so that CI
// (no GPU) runs the real kernel code: every block of a grid runs in turn,
// each of its threads on its own std::thread, with __syncthreads as a block
// barrier, warp shuffles through a per-warp exchange, __shared__ as static
// storage (one block at a time), fp16 as _Float16, bf16 as rounded bits and
// WMMA fragments as whole 16 x 16 matrices held by every lane (products in
// fp32, accumulated in k order; TF32 inputs rounded to 10 mantissa bits).
// Dynamic shared memory is a heap buffer of the launch's size per block (so
// AddressSanitizer sees overruns); cp.async copies are queued per thread and
// performed, in commit order, only when cp.async.wait_group lets them be
// complete, so a stage read before its wait sees stale data, as on a GPU.
// The PTX ldmatrix and mma.sync.m16n8k16 keep their per-lane fragment
// layouts: each lane holds only its own registers, and a warp exchange
// (gather_words) hands every lane the row addresses or fragments it needs.
// It checks the kernels' indexing, synchronisation and arithmetic, not their
// speed or the hardware's exact summation order.
//
// Launches are serialised process-wide (launch_mutex): __shared__ arrays are
// static storage, one copy per kernel (and per device function, e.g. a block
// reduction's scratch shared by several kernels), so two grids launched from
// two host threads at once, as Python threads calling the loss do, would
// read each other's shared memory. On a GPU every block has its own.
//
// setup.py compiles csrc/cuda/*.cu as C++ against these headers (launches
// `k<<<grid, block, smem, stream>>>(args)` rewritten to
// clipfast_emulation::launch) into clipfast._cuda_emulated.
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// Kernel code tests this to call the emulated cp.async, dynamic shared memory
// and bit casts instead of PTX.
#define CLIPFAST_CUDA_EMULATION 1

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9
};
enum cudaSharedCarveout { cudaSharedmemCarveoutMaxShared = 100 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline const char* cudaGetErrorString(cudaError_t) { return "no error (emulated)"; }

// ------------------------------ half types -------------------------------- //

struct __half {
  _Float16 value;
};
inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  return __uint_as_float(static_cast<uint32_t>(h.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// ------------------------------ execution --------------------------------- //

namespace clipfast_emulation {

struct Warp {
  std::barrier<> barrier{32};
  float slots[32];
  uint64_t words[32][32];  // gather_words
};

struct Block {
  explicit Block(int threads) : barrier(threads), warps((threads + 31) / 32) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::atomic<int> votes[3] = {0, 0, 0};  // __syncthreads_or, in rotation
};

inline thread_local Block* current_block = nullptr;
inline thread_local unsigned vote_round = 0;  // this thread's __syncthreads_or calls
inline thread_local unsigned char* dynamic_shared_memory = nullptr;

// cp.async: 16-byte copies (zero fill when !valid) queued per thread; commit
// closes a group; wait(n) performs every group but the newest n, in order.
struct AsyncCopy {
  void* dst;
  const void* src;  // null: zero fill
};
inline thread_local std::vector<std::vector<AsyncCopy>> async_committed;
inline thread_local std::vector<AsyncCopy> async_open;

inline void cp_async16(void* dst, const void* src, bool valid) {
  async_open.push_back(AsyncCopy{dst, valid ? src : nullptr});
}
inline void cp_async_commit() {
  async_committed.push_back(std::move(async_open));
  async_open.clear();
}
inline void cp_async_wait(int pending) {
  const int complete = static_cast<int>(async_committed.size()) - pending;
  for (int g = 0; g < complete; ++g)
    for (const AsyncCopy& c : async_committed[g]) {
      if (c.src != nullptr) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
  if (complete > 0) async_committed.erase(async_committed.begin(), async_committed.begin() + complete);
}

inline int lane() { return static_cast<int>(threadIdx.x % 32); }

inline float exchange(float value, int source_lane) {
  Warp& w = *current_block->warps[threadIdx.x / 32];
  w.slots[lane()] = value;
  w.barrier.arrive_and_wait();
  const float out = w.slots[source_lane];
  w.barrier.arrive_and_wait();
  return out;
}

// Every lane's N words, in every lane (warp-synchronous).
template <int N>
inline void gather_words(const uint64_t (&mine)[N], uint64_t (&all)[32][N]) {
  static_assert(N <= 32, "32 words per lane");
  Warp& w = *current_block->warps[threadIdx.x / 32];
  for (int i = 0; i < N; ++i) w.words[lane()][i] = mine[i];
  w.barrier.arrive_and_wait();
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < N; ++i) all[l][i] = w.words[l][i];
  w.barrier.arrive_and_wait();
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16, COUNT of them at once
// (one warp exchange): for load c, lanes 8q..8q+7 give the row addresses of
// 8 x 8 matrix q; lane l receives in r[c][q] the two 16-bit elements (row l/4,
// columns 2(l%4), 2(l%4)+1) of matrix q, or of its transpose when trans[c].
template <int COUNT>
inline void ldmatrix_x4_many(uint32_t (&r)[COUNT][4], const void* const (&row_address)[COUNT],
                             const bool (&trans)[COUNT]) {
  uint64_t mine[COUNT];
  for (int c = 0; c < COUNT; ++c) mine[c] = reinterpret_cast<uint64_t>(row_address[c]);
  uint64_t all[32][COUNT];
  gather_words(mine, all);
  const int l = lane();
  for (int c = 0; c < COUNT; ++c)
    for (int q = 0; q < 4; ++q) {
      auto at = [&](int row, int col) {
        uint16_t v;
        std::memcpy(&v, reinterpret_cast<const unsigned char*>(all[8 * q + row][c]) + 2 * col, 2);
        return static_cast<uint32_t>(v);
      };
      const int a = l / 4, b = 2 * (l % 4);
      r[c][q] = trans[c] ? at(b, a) | (at(b + 1, a) << 16) : at(a, b) | (at(a, b + 1) << 16);
    }
}

inline float half_bits_to_float(uint32_t bits, bool bf16) {
  if (bf16) return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(bits)});
  _Float16 h;
  const uint16_t v = static_cast<uint16_t>(bits);
  std::memcpy(&h, &v, 2);
  return static_cast<float>(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 for every
// (i, j) of M x N tiles at once (one warp exchange): c[i][j] += A_i B_j with
// the PTX fragment layouts (g = lane / 4, t = lane % 4): a[i][0..3] =
// A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]; b[j][0..1] =
// B[2t..][g], B[2t+8..][g]; c[0..3] = C[g][2t], C[g][2t+1], C[g+8][2t],
// C[g+8][2t+1]. Products in fp32, accumulated in k order.
template <int M, int N>
inline void mma_m16n8k16_tiles(float (&c)[M][N][4], const uint32_t (&a)[M][4],
                               const uint32_t (&b)[N][2], bool bf16) {
  uint64_t mine[4 * M + 2 * N];
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < 4; ++r) mine[4 * i + r] = a[i][r];
  for (int j = 0; j < N; ++j)
    for (int r = 0; r < 2; ++r) mine[4 * M + 2 * j + r] = b[j][r];
  uint64_t all[32][4 * M + 2 * N];
  gather_words(mine, all);
  auto half = [&](uint64_t word, int k) {
    return half_bits_to_float(static_cast<uint32_t>(word >> (16 * (k % 2))) & 0xffffu, bf16);
  };
  const int g = lane() / 4, t = lane() % 4;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e % 2);
        float sum = c[i][j][e];
        for (int k = 0; k < 16; ++k) {
          const float av = half(all[(row % 8) * 4 + (k % 8) / 2][4 * i + (row >= 8) + 2 * (k >= 8)], k);
          const float bv = half(all[col * 4 + (k % 8) / 2][4 * M + 2 * j + (k >= 8)], k);
          sum += av * bv;
        }
        c[i][j][e] = sum;
      }
}

// One for the whole process (an inline function's static is shared by every
// translation unit), not one per kernel: see the note at the top.
inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

// Runs body() as every thread of every block of the grid (1-D blocks), with
// dynamic_shared_bytes of dynamic shared memory per block. One grid at a time.
template <typename Body>
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, Body&& body) {
  const std::lock_guard<std::mutex> one_grid_at_a_time(launch_mutex());
  const int threads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block state(threads);
        // 128-byte aligned, exactly as large as asked (rounded up to 128).
        std::unique_ptr<unsigned char, void (*)(void*)> dynamic_shared(nullptr, std::free);
        if (dynamic_shared_bytes > 0)
          dynamic_shared.reset(static_cast<unsigned char*>(
              std::aligned_alloc(128, (dynamic_shared_bytes + 127) / 128 * 128)));
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx.x = static_cast<unsigned>(t) % block.x;
            threadIdx.y = (static_cast<unsigned>(t) / block.x) % block.y;
            threadIdx.z = static_cast<unsigned>(t) / (block.x * block.y);
            blockIdx.x = bx;
            blockIdx.y = by;
            blockIdx.z = bz;
            blockDim = block;
            gridDim = grid;
            current_block = &state;
            dynamic_shared_memory = dynamic_shared.get();
            body();
            cp_async_wait(0);  // a kernel may exit with copies in flight
          });
        }
        for (auto& th : pool) th.join();
      }
}
template <typename Body>
void launch(dim3 grid, dim3 block, Body&& body) {
  launch(grid, block, 0, static_cast<Body&&>(body));
}

}  // namespace clipfast_emulation

inline void __syncthreads() { clipfast_emulation::current_block->barrier.arrive_and_wait(); }
// Round r votes in slot r % 3. Slot (r + 1) % 3 was last read in round r - 2,
// before everyone reached round r - 1's barrier, and is next written after
// round r's: thread 0 clears it in between.
inline int __syncthreads_or(int predicate) {
  using namespace clipfast_emulation;
  Block& b = *current_block;
  const unsigned round = vote_round++;
  if (threadIdx.x == 0) b.votes[(round + 1) % 3].store(0);
  if (predicate) b.votes[round % 3].fetch_or(1);
  b.barrier.arrive_and_wait();
  return b.votes[round % 3].load();
}
inline float __shfl_xor_sync(unsigned, float value, int mask) {
  return clipfast_emulation::exchange(value, clipfast_emulation::lane() ^ mask);
}
inline float __shfl_down_sync(unsigned, float value, int offset) {
  const int source = clipfast_emulation::lane() + offset;
  return clipfast_emulation::exchange(value, source < 32 ? source : clipfast_emulation::lane());
}

// --------------------------------- WMMA ----------------------------------- //

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

inline float to_f32(float v) { return v; }
inline float to_f32(__half v) { return __half2float(v); }
inline float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// The whole logical matrix, row-major, in every lane.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = typename storage<T>::type;
  element_type x[num_elements];
};

// cvt.rna.tf32.f32: round to nearest, ties away from zero, 10 mantissa bits.
inline float __float_to_tf32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (auto& e : f.x) e = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += to_f32(a.x[i * K + k]) * to_f32(b.x[k * N + j]);
      out[i * N + j] = sum;
    }
  std::copy(out, out + M * N, d.x);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  if (clipfast_emulation::lane() != 0) return;  // one lane writes what all hold
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * N + j];
}

}  // namespace wmma
}  // namespace nvcuda
