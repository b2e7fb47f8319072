// Helpers shared by the CUDA translation units of the backend. Kernels are
// defined in exactly one .cu file each (a template kernel defined in two
// units would be registered twice); the other units call their launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "clipfast/tile_math.h"
#include "cuda/clip_loss_cuda.h"

namespace clipfast {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Out>
__device__ __forceinline__ Out from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Merges (m, s) log-sum-exp partials across the `width` consecutive lanes
// (a power of two) that share one line; every lane ends with the total.
__device__ __forceinline__ void lse_merge_lanes(float& m, float& s, int width) {
  for (int offset = 1; offset < width; offset *= 2) {
    const float other_m = __shfl_xor_sync(0xffffffffu, m, offset);
    const float other_s = __shfl_xor_sync(0xffffffffu, s, offset);
    lse_merge(m, s, other_m, other_s);
  }
}

// The normalisation backward of one row, by one warp: out[k] =
// (g_k - x^_k <x^, g>) / |x| with g_k = grad_at(k) (just g without
// normalize). Each element is read through grad_at and then written by the
// same lane, so out may alias what grad_at reads.
template <typename In, typename GradAt>
__device__ __forceinline__ void finish_row(GradAt grad_at, const In* features, float inv,
                                           int64_t d, bool normalize, In* out) {
  const int lane = threadIdx.x % 32;
  float radial = 0.f;
  if (normalize && !norm_is_clamped(inv)) {
    for (int64_t k = lane; k < d; k += 32)
      radial = fmaf(grad_at(k), to_float(features[k]) * inv, radial);
    for (int offset = 16; offset > 0; offset /= 2)
      radial += __shfl_xor_sync(0xffffffffu, radial, offset);
  }
  for (int64_t k = lane; k < d; k += 32) {
    float g = grad_at(k);
    if (normalize) g = (g - to_float(features[k]) * inv * radial) * inv;
    out[k] = from_float<In>(g);
  }
}

// Sum of `value` over a block of THREADS threads (a multiple of 32), in a
// fixed order; the result is valid in thread 0. Every thread must call it.
template <int THREADS>
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[THREADS / 32];
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int w = 0; w < THREADS / 32; ++w) total += warp_sums[w];
  return total;
}

// Raises the last launch error as a C++ exception naming the kernel
// (pybind11 turns it into a Python RuntimeError).
inline void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("clipfast._cuda: launching ") + kernel + " failed: " +
                             cudaGetErrorString(err));
  }
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------- cp.async (sm_80+) and dynamic shared memory ----------- //
// The CPU emulation (csrc/emulate, CLIPFAST_CUDA_EMULATION) queues the copies
// and performs them at the wait that lets them be complete.

// 16 bytes global -> shared without a register round trip; zeros when !valid
// (src-size 0: nothing is read, src need only be a mapped address).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src, bool valid) {
#ifdef CLIPFAST_CUDA_EMULATION
  clipfast_emulation::cp_async16(smem_dst, src, valid);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef CLIPFAST_CUDA_EMULATION
  clipfast_emulation::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most PENDING of this thread's committed groups are in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#ifdef CLIPFAST_CUDA_EMULATION
  clipfast_emulation::cp_async_wait(PENDING);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

#ifndef CLIPFAST_CUDA_EMULATION
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address
// of row l % 8 of 8 x 8 matrix l / 8 (16-byte aligned, shared memory) and
// receives its share r[0..3] of the four matrices (of their transposes).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  }
}
#endif

// One k16 step's operand fragments: M ldmatrix.x4 (transposed when TA) into
// a, N into b (TB). The emulation does them in one warp exchange.
template <bool TA, bool TB, int M, int N>
__device__ __forceinline__ void ldmatrix_x4_step(uint32_t (&a)[M][4], const void* const (&pa)[M],
                                                 uint32_t (&b)[N][4], const void* const (&pb)[N]) {
#ifdef CLIPFAST_CUDA_EMULATION
  uint32_t r[M + N][4];
  const void* p[M + N];
  bool trans[M + N];
  for (int i = 0; i < M + N; ++i) {
    p[i] = i < M ? pa[i] : pb[i - M];
    trans[i] = i < M ? TA : TB;
  }
  clipfast_emulation::ldmatrix_x4_many(r, p, trans);
  for (int i = 0; i < M + N; ++i)
    for (int q = 0; q < 4; ++q) (i < M ? a[i][q] : b[i - M][q]) = r[i][q];
#else
#pragma unroll
  for (int i = 0; i < M; ++i) ldmatrix_x4<TA>(a[i], pa[i]);
#pragma unroll
  for (int j = 0; j < N; ++j) ldmatrix_x4<TB>(b[j], pb[j]);
#endif
}

// c[i][j] += A_i B_j on tensor cores for M x N tiles of
// mma.sync.aligned.m16n8k16.row.col.f32 with fp16 / bf16 (In) operands in the
// PTX fragment layouts. The emulation does them in one warp exchange.
template <typename In, int M, int N>
__device__ __forceinline__ void mma_16816_tiles(float (&c)[M][N][4], const uint32_t (&a)[M][4],
                                                const uint32_t (&b)[N][2]) {
#ifdef CLIPFAST_CUDA_EMULATION
  clipfast_emulation::mma_m16n8k16_tiles(c, a, b, std::is_same<In, __nv_bfloat16>::value);
#else
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if constexpr (std::is_same<In, __nv_bfloat16>::value) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[i][j][0]), "+f"(c[i][j][1]), "+f"(c[i][j][2]), "+f"(c[i][j][3])
            : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[j][0]), "r"(b[j][1]));
      } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[i][j][0]), "+f"(c[i][j][1]), "+f"(c[i][j][2]), "+f"(c[i][j][3])
            : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[j][0]), "r"(b[j][1]));
      }
    }
#endif
}

#ifdef CLIPFAST_CUDA_EMULATION
#define CLIPFAST_DYNAMIC_SHARED(name) unsigned char* name = ::clipfast_emulation::dynamic_shared_memory
#else
#define CLIPFAST_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// 16-byte vector loads are legal when every row starts 16-byte aligned.
inline bool rows_are_16b_aligned(const void* base, int64_t d, int64_t element_bytes) {
  return reinterpret_cast<std::uintptr_t>(base) % 16 == 0 && (d * element_bytes) % 16 == 0;
}

// Defined in clip_loss_cuda.cu.
//
// out[r] = factor * coef * (g - f^ <f^, g>) * inv_norm[r] for r < rows, where
// g = sum of `parts` fp32 partials acc[t * part_stride + r * d + k] and
// coef = *coef_device (1 when null): the normalisation backward, in the
// features' dtype. Reading coef on the device keeps the backward free of
// host synchronisation.
template <typename In>
void launch_finish(const float* acc, int64_t parts, int64_t part_stride, const In* features,
                   const float* inv_norm, int64_t rows, int64_t d, float factor,
                   const float* coef_device, bool normalize, In* out, cudaStream_t stream,
                   const char* what);

// Defined in clip_loss_cuda.cu: inv[r] = 1 / max(|x_r|, eps) (1 without
// normalize) for the n rows of x, the inverse norms every loss shares.
template <typename In>
void launch_inverse_norms(const In* x, int64_t n, int64_t d, bool normalize, float* inv,
                          cudaStream_t stream, const char* what);

// Defined in tiles.cu: the forward tile sweep (statistics partials and the
// diagonal), after the inverse norms.
template <typename In>
void forward_tiles(const Params<In>& p, const Stats& s, const Workspace& w, bool tensor_cores,
                   cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
