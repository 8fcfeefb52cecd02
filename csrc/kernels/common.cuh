// Shared by every ptkernels CUDA kernel: dtype conversions, the launch macro, small math helpers.
//
// Torch-free on purpose: the kernels compile with nvcc for the extension (csrc/*.cu include them)
// AND with g++ against the SIMT shim of tests/host_harness (PTK_HOST_HARNESS defined), so the host
// harness runs exactly this code on the CPU.
#pragma once

#ifdef PTK_HOST_HARNESS
#include "simt_shim.h"
using ptk_stream_t = void*;
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
using ptk_stream_t = cudaStream_t;
#define PTK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define PTK_DYNAMIC_SMEM(type, name)                     \
  extern __shared__ __align__(128) unsigned char ptk_dynamic_smem_[]; /* ldmatrix / cp.async need 16 B */ \
  type* name = reinterpret_cast<type*>(ptk_dynamic_smem_)
#endif

#include <cmath>
#include <cstdint>

namespace ptk {

// Loads/stores in the storage dtype, math in float32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int ceil_div_h(int a, int b) { return (a + b - 1) / b; }

// Reductions over the `width` consecutive lanes of a lane group (width a power of two <= 32). Every
// lane of the warp must call them (no divergence), which both the GPU and the shim require.
template <int width>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int off = width / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off, width));
  return v;
}
template <int width>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = width / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off, width);
  return v;
}

}  // namespace ptk
