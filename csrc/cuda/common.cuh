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

// Defined in tiles.cu: the forward tile sweep (statistics partials and the
// diagonal), after the inverse norms.
template <typename In>
void forward_tiles(const Params<In>& p, const Stats& s, const Workspace& w, bool tensor_cores,
                   cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
